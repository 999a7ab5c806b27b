//! Spool directory and file permissions are checked at start, through the real binary.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

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

#[track_caller]
fn mode(path: &std::path::Path) -> u32 {
    ok(std::fs::metadata(path)).permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_files_are_created_0600_and_a_world_writable_one_is_refused_untouched() {
    let dir = ok(tempfile::tempdir());
    let spool = dir.path().join("spool.db");
    let wal = dir.path().join("spool.db-wal");
    let shm = dir.path().join("spool.db-shm");
    let builder = AgentProcess::builder().spool(&spool);

    let mut agent = ok(builder.clone().start().await);
    for file in [&spool, &wal, &shm] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // A kill leaves the -wal and -shm files behind.
    agent.kill();
    assert!(wal.exists() && shm.exists());

    for (file, loose) in [(&wal, 0o646), (&spool, 0o666)] {
        ok(std::fs::set_permissions(
            file,
            std::fs::Permissions::from_mode(loose),
        ));
        let before = ok(std::fs::read(file));
        let e = match builder.clone().start().await {
            Ok(_) => panic!("agent started with {} mode {loose:o}", file.display()),
            Err(e) => e,
        };
        let path = file.display().to_string();
        assert!(
            e.contains(&format!("spool file {path} is world-writable"))
                && e.contains(&format!("chmod 600 {path}")),
            "{e}"
        );
        assert_eq!(mode(file), loose, "the mode is reported, not changed");
        assert_eq!(
            ok(std::fs::read(file)),
            before,
            "the file is left as it was"
        );
        ok(std::fs::set_permissions(
            file,
            std::fs::Permissions::from_mode(0o600),
        ));
    }

    // A group-writable file is accepted, and set back to 0600.
    ok(std::fs::set_permissions(
        &spool,
        std::fs::Permissions::from_mode(0o660),
    ));
    let mut agent = ok(builder.start().await);
    assert_eq!(mode(&spool), 0o600);
    agent.kill();
}
