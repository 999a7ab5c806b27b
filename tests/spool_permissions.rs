//! Spool directory permissions are checked at start, through the real binary.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_writable_spool_directory_is_refused_naming_the_path() {
    let dir = ok(tempfile::tempdir());
    let spool_dir = dir.path().join("shared");
    ok(std::fs::create_dir(&spool_dir));
    ok(std::fs::set_permissions(
        &spool_dir,
        std::fs::Permissions::from_mode(0o1777),
    ));
    let spool = spool_dir.join("spool.db");
    let started = AgentProcess::builder().spool(&spool).start().await;
    let e = match started {
        Ok(_) => panic!("agent started with a world-writable spool directory"),
        Err(e) => e,
    };
    assert!(
        e.contains("world-writable") && e.contains(&spool_dir.display().to_string()),
        "{e}"
    );
    assert!(!spool.exists(), "no spool file was created");

    // The same directory without write access for others is fine.
    ok(std::fs::set_permissions(
        &spool_dir,
        std::fs::Permissions::from_mode(0o755),
    ));
    let mut agent = ok(AgentProcess::builder().spool(&spool).start().await);
    agent.kill();
}
