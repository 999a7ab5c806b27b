//! The real `telespool top` in a real terminal (tmux): it draws from the
//! agent, quits on `q` and gives the terminal back as it found it.
//!
//! Skipped, saying so, when tmux is not installed.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// tmux on its own server socket `server`, so tests never touch a user's.
fn tmux(server: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("tmux")
        .args(["-L", server])
        .args(args)
        .output()
        .map_err(|e| format!("tmux: {e}"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Kills the tmux server when the test ends, passed or failed.
struct Server(String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = tmux(&self.0, &["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_in_a_terminal_quits_on_q_and_restores_the_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("tmux is not installed: skipping the terminal test of telespool top");
        return;
    }
    let agent = ok(AgentProcess::builder().start().await);
    let dir = ok(tempfile::tempdir());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (before, after, exit) = (file("before"), file("after"), file("exit"));
    let script = format!(
        "stty -g > {before}; {bin} top --admin-listen {admin} --interval 250ms; echo $? > {exit}; stty -g > {after}.part; mv {after}.part {after}; sleep 60",
        bin = env!("CARGO_BIN_EXE_telespool"),
        admin = agent.admin_addr(),
    );
    let server = Server(format!("telespool-test-{}", std::process::id()));
    ok(tmux(
        &server.0,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "120",
            "-y",
            "30",
            "sh",
            "-c",
            &script,
        ],
    ));
    let screen = || tmux(&server.0, &["capture-pane", "-t", "top", "-p"]).unwrap_or_default();
    let drawn = ok(eventually("top draws a live frame", DEADLINE, || async {
        let s = screen();
        s.contains("live · refresh 250ms").then_some(s)
    })
    .await);
    assert!(
        drawn.contains(&format!("at {} · ready", agent.admin_addr())),
        "{drawn}"
    );
    assert!(drawn.contains("signal        in/s"), "{drawn}");

    ok(tmux(&server.0, &["send-keys", "-t", "top", "q"]));
    // `after` appears whole (renamed into place) once top has exited.
    ok(eventually("top exits after q", DEADLINE, || async {
        Path::new(&after).exists().then_some(())
    })
    .await);
    let code = ok(std::fs::read_to_string(&exit));
    assert_eq!(code.trim(), "0", "top's exit status");
    let (before, after) = (
        ok(std::fs::read_to_string(&before)),
        ok(std::fs::read_to_string(&after)),
    );
    assert_eq!(before, after, "terminal modes (stty -g) after top = before");
    let left = screen();
    assert!(
        !left.contains("live · refresh"),
        "the alternate screen is gone:\n{left}"
    );
}
