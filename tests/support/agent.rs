//! The real telespool binary as a child process.
//!
//! `AgentProcess::builder()...start().await` runs
//! `telespool run --config C --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0
//! --admin-listen 127.0.0.1:0 --spool S [--upstream U] [extra args]` with a
//! clean environment (no `RUST_LOG`, no inherited `TELESPOOL_*`, `NO_COLOR=1`),
//! then waits for the one stderr line containing `listening` with fields
//! `grpc=ADDR http=ADDR admin=ADDR` and reads the bound addresses from it.
//! Every stderr line is kept (ANSI escapes stripped) and echoed to the test's
//! stderr as `[agent PID] line`, so a failing test shows the agent's log.
//!
//! `listen_fds` hands pre-bound listeners to the agent the way systemd's
//! socket activation does: as fds 3, 4, … with `LISTEN_FDS` and `LISTEN_PID`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal as UnixSignal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long `start` waits for the `listening` line.
pub const START_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);
/// How long to wait for the stderr reader to see EOF after the child exited.
const READER_DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// Configures and starts an [`AgentProcess`].
#[derive(Clone, Debug)]
pub struct AgentBuilder {
    program: PathBuf,
    prefix_args: Vec<OsString>,
    upstream: Option<String>,
    spool: Option<PathBuf>,
    config_toml: String,
    env: Vec<(String, String)>,
    args: Vec<OsString>,
    grpc_listen: String,
    http_listen: String,
    admin_listen: String,
    start_deadline: Duration,
    dir: Option<Arc<TempDir>>,
    /// Passed as fds 3, 4, … (socket activation); kept across restarts.
    listen_fds: Vec<Arc<OwnedFd>>,
}

impl AgentBuilder {
    /// `--upstream URL` (for example `upstream.endpoint()`).
    pub fn upstream(mut self, url: &str) -> Self {
        self.upstream = Some(url.to_owned());
        self
    }

    /// `--spool PATH`; default `<temp dir>/spool.db`, kept across `restart`.
    pub fn spool(mut self, path: impl AsRef<Path>) -> Self {
        self.spool = Some(path.as_ref().to_owned());
        self
    }

    /// Contents of the config file passed as `--config` (default: empty).
    pub fn config_toml(mut self, toml: &str) -> Self {
        self.config_toml = toml.to_owned();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// An extra argument, after the standard ones.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Listen addresses (default `127.0.0.1:0` each).
    pub fn grpc_listen(mut self, addr: &str) -> Self {
        self.grpc_listen = addr.to_owned();
        self
    }
    pub fn http_listen(mut self, addr: &str) -> Self {
        self.http_listen = addr.to_owned();
        self
    }
    pub fn admin_listen(mut self, addr: &str) -> Self {
        self.admin_listen = addr.to_owned();
        self
    }

    /// Socket activation without systemd: each listener (a duplicate of it)
    /// becomes fd 3, 4, … of the agent, with `LISTEN_FDS` = their count and
    /// `LISTEN_PID` = the agent's pid (set by `sh -c '… exec'`, which keeps
    /// the pid). `LISTEN_FDNAMES` can be added with [`env`](Self::env).
    pub fn listen_fds(mut self, listeners: &[&std::net::TcpListener]) -> Self {
        self.listen_fds = listeners
            .iter()
            .map(|l| Arc::new(OwnedFd::from(l.try_clone().expect("dup listener"))))
            .collect();
        self
    }

    pub fn start_deadline(mut self, d: Duration) -> Self {
        self.start_deadline = d;
        self
    }

    /// Runs `program` with `prefix_args` before the standard arguments instead
    /// of the telespool binary. For the harness's own tests (a shell script
    /// standing in for the agent), not for product tests.
    pub fn program(mut self, program: impl Into<PathBuf>, prefix_args: &[&str]) -> Self {
        self.program = program.into();
        self.prefix_args = prefix_args.iter().map(OsString::from).collect();
        self
    }

    /// Starts the process and waits for its `listening` line.
    pub async fn start(mut self) -> Result<AgentProcess, String> {
        let dir = match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = Arc::new(
                    tempfile::Builder::new()
                        .prefix("telespool-test-")
                        .tempdir()
                        .map_err(|e| format!("creating agent temp dir: {e}"))?,
                );
                self.dir = Some(dir.clone());
                dir
            }
        };
        let spool = self
            .spool
            .get_or_insert_with(|| dir.path().join("spool.db"))
            .clone();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, &self.config_toml)
            .map_err(|e| format!("writing {}: {e}", config_path.display()))?;

        let mut cmd = if self.listen_fds.is_empty() {
            Command::new(&self.program)
        } else {
            // `exec` keeps the shell's pid, so $$ is the agent's pid.
            let mut sh = Command::new("/bin/sh");
            sh.arg("-c")
                .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
                .arg(&self.program)
                .env("LISTEN_FDS", self.listen_fds.len().to_string());
            let fds: Vec<i32> = self.listen_fds.iter().map(|fd| fd.as_raw_fd()).collect();
            // SAFETY: between fork and exec only async-signal-safe calls
            // (fcntl, dup2, close) on fds this process owns.
            unsafe {
                sh.pre_exec(move || pass_fds(&fds));
            }
            sh
        };
        cmd.args(&self.prefix_args)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--grpc-listen")
            .arg(&self.grpc_listen)
            .arg("--http-listen")
            .arg(&self.http_listen)
            .arg("--admin-listen")
            .arg(&self.admin_listen)
            .arg("--spool")
            .arg(&spool);
        if let Some(upstream) = &self.upstream {
            cmd.arg("--upstream").arg(upstream);
        }
        cmd.args(&self.args);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("TELESPOOL_") || name == "RUST_LOG" || name.starts_with("OTEL_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("NO_COLOR", "1").env("RUST_BACKTRACE", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.program.display()))?;
        let pid = child.id();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            spawn_reader(
                child.stderr.take().expect("piped stderr"),
                lines.clone(),
                format!("[agent {pid}]"),
            ),
            spawn_reader(
                child.stdout.take().expect("piped stdout"),
                stdout_lines.clone(),
                format!("[agent {pid} stdout]"),
            ),
        ];
        let mut agent = AgentProcess {
            child,
            exit: None,
            lines,
            stdout_lines,
            readers,
            addrs: ListenAddrs::default(),
            spool,
            builder: self,
        };

        let started = Instant::now();
        loop {
            if let Some(line) = agent.find_line(|l| parse_listening_line(l).is_some()) {
                agent.addrs = parse_listening_line(&line).expect("checked above");
                return Ok(agent);
            }
            if let Some(status) = agent.try_wait() {
                agent.drain_readers();
                // The line may have arrived together with the exit.
                if let Some(line) = agent.find_line(|l| parse_listening_line(l).is_some()) {
                    agent.addrs = parse_listening_line(&line).expect("checked above");
                    return Ok(agent);
                }
                return Err(format!(
                    "agent exited with {status} before logging `listening`; stderr:\n{}",
                    agent.stderr()
                ));
            }
            if started.elapsed() >= agent.builder.start_deadline {
                agent.kill();
                return Err(format!(
                    "agent did not log `listening` within {:?}; stderr:\n{}",
                    agent.builder.start_deadline,
                    agent.stderr()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// In the forked child: move `fds` to 3, 4, … without close-on-exec. Each is
/// first duplicated above the target range, so a source fd that is itself
/// one of the targets is not overwritten before it is moved.
fn pass_fds(fds: &[i32]) -> std::io::Result<()> {
    use nix::libc;
    let high = 3 + fds.len() as i32 + 16;
    let mut moved = [0i32; 16];
    if fds.len() > moved.len() {
        return Err(std::io::Error::other("too many listen fds"));
    }
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: fcntl on an fd owned by this process.
        let tmp = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, high) };
        if tmp < 0 {
            return Err(std::io::Error::last_os_error());
        }
        moved[i] = tmp;
    }
    for (i, tmp) in moved[..fds.len()].iter().enumerate() {
        // SAFETY: dup2 onto a descriptor number this child may reuse; the
        // new descriptor does not have close-on-exec.
        if unsafe { libc::dup2(*tmp, 3 + i as i32) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: closing the temporary duplicate made above.
        unsafe { libc::close(*tmp) };
    }
    Ok(())
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    prefix: String,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("agent-output-{prefix}"))
        .spawn(move || {
            let reader = BufReader::new(stream);
            for line in reader.split(b'\n') {
                let Ok(line) = line else { break };
                let line = strip_ansi(&String::from_utf8_lossy(&line));
                let line = line.trim_end_matches('\r').to_owned();
                eprintln!("{prefix} {line}");
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        })
        .expect("spawn agent output reader thread")
}

/// Removes ANSI escape sequences (colours), in case the agent emits them.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters until a final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Addresses from the `listening` line; a listener that is disabled is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenAddrs {
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// `key=value` from a tracing text line; value unquoted, trailing `,` removed.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|token| {
        let value = token.strip_prefix(key)?.strip_prefix('=')?;
        Some(value.trim_end_matches(',').trim_matches('"'))
    })
}

/// Parses the agent's `listening` line; `None` if `line` is not it (needs the
/// word `listening` and at least one of the address fields).
pub fn parse_listening_line(line: &str) -> Option<ListenAddrs> {
    if !line.contains("listening") {
        return None;
    }
    let field = |key| log_field(line, key).and_then(|v| v.parse::<SocketAddr>().ok());
    let addrs = ListenAddrs {
        grpc: field("grpc"),
        http: field("http"),
        admin: field("admin"),
    };
    (addrs != ListenAddrs::default()).then_some(addrs)
}

/// A running (or exited) telespool process. Killed on drop if still running.
pub struct AgentProcess {
    child: Child,
    exit: Option<ExitStatus>,
    lines: Arc<Mutex<Vec<String>>>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    addrs: ListenAddrs,
    spool: PathBuf,
    builder: AgentBuilder,
}

impl AgentProcess {
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            program: PathBuf::from(env!("CARGO_BIN_EXE_telespool")),
            prefix_args: Vec::new(),
            upstream: None,
            spool: None,
            config_toml: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            grpc_listen: "127.0.0.1:0".to_owned(),
            http_listen: "127.0.0.1:0".to_owned(),
            admin_listen: "127.0.0.1:0".to_owned(),
            start_deadline: START_DEADLINE,
            dir: None,
            listen_fds: Vec::new(),
        }
    }

    #[track_caller]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addrs
            .grpc
            .expect("the agent's listening line has no grpc= address")
    }

    #[track_caller]
    pub fn http_addr(&self) -> SocketAddr {
        self.addrs
            .http
            .expect("the agent's listening line has no http= address")
    }

    #[track_caller]
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs
            .admin
            .expect("the agent's listening line has no admin= address")
    }

    pub fn addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// `http://GRPC_ADDR`, for SDK exporters.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr())
    }

    pub fn spool_path(&self) -> &Path {
        &self.spool
    }

    /// The temp dir holding config and default spool (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        self.builder.dir.as_ref().expect("set by start").path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a Unix signal (SIGTERM, SIGINT, SIGKILL...).
    #[track_caller]
    pub fn signal(&self, signal: UnixSignal) {
        // Once reaped, the pid may belong to another process.
        assert!(
            self.exit.is_none(),
            "agent {} already exited ({:?}); not sending {signal}",
            self.child.id(),
            self.exit
        );
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .unwrap_or_else(|e| panic!("sending {signal} to agent {}: {e}", self.child.id()));
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait on agent");
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// The exit status once exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.try_wait()
    }

    /// Polls for exit for up to `deadline`. On timeout kills the process and
    /// returns `None`. After an exit, all of stderr has been read.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                self.drain_readers();
                return Some(status);
            }
            if started.elapsed() >= deadline {
                eprintln!(
                    "[agent {}] did not exit within {deadline:?}; killing it",
                    self.child.id()
                );
                self.kill();
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL and reap (no-op if already exited).
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
        self.drain_readers();
    }

    /// Waits (bounded) for the output readers to reach EOF.
    fn drain_readers(&mut self) {
        let started = Instant::now();
        while self.readers.iter().any(|r| !r.is_finished())
            && started.elapsed() < READER_DRAIN_DEADLINE
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }

    /// Every stderr line so far, joined with newlines.
    pub fn stderr(&self) -> String {
        self.stderr_lines().join("\n")
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn find_line(&self, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| pred(l))
            .cloned()
    }

    /// Polls until a stderr line contains `needle`; returns that line.
    pub async fn wait_for_log(&self, needle: &str, deadline: Duration) -> Result<String, String> {
        let started = Instant::now();
        loop {
            if let Some(line) = self.find_line(|l| l.contains(needle)) {
                return Ok(line);
            }
            if started.elapsed() >= deadline {
                return Err(format!(
                    "agent did not log {needle:?} within {deadline:?}; stderr:\n{}",
                    self.stderr()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The `shutdown complete` line, if logged.
    pub fn summary_line(&self) -> Option<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|l| l.contains("shutdown complete"))
            .cloned()
    }

    /// A numeric field (`received`, `forwarded`, `spooled`, `dropped`...) of
    /// the `shutdown complete` line.
    pub fn summary_field(&self, name: &str) -> Option<u64> {
        let line = self.summary_line()?;
        log_field(&line, name)?.parse().ok()
    }

    /// Starts a new process with the same arguments, config and spool, on
    /// fresh ports. Kills the current process first if it is still running
    /// (to restart gracefully, `signal(SIGTERM)` and `wait_exit` first).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.restart_with(self.builder.clone()).await
    }

    /// Like [`restart`](Self::restart) but on the same listen addresses as
    /// the current process (so clients keep their endpoints).
    pub async fn restart_same_addrs(&mut self) -> Result<(), String> {
        let mut builder = self.builder.clone();
        if let Some(a) = self.addrs.grpc {
            builder.grpc_listen = a.to_string();
        }
        if let Some(a) = self.addrs.http {
            builder.http_listen = a.to_string();
        }
        if let Some(a) = self.addrs.admin {
            builder.admin_listen = a.to_string();
        }
        self.restart_with(builder).await
    }

    /// Restarts with a modified builder (same temp dir and spool).
    pub async fn restart_with(&mut self, builder: AgentBuilder) -> Result<(), String> {
        self.kill();
        let next = builder.start().await?;
        *self = next;
        Ok(())
    }

    /// The builder this process was started from (same temp dir and spool),
    /// for `restart_with`.
    pub fn builder_for_restart(&self) -> AgentBuilder {
        self.builder.clone()
    }

    /// `GET path` on the admin listener; (status code, body).
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.admin_addr(), path).await
    }

    /// The value of one Prometheus sample from `/metrics`, matched by its
    /// full name with labels as printed (e.g. `foo_total{signal="traces"}`).
    pub async fn metric(&self, sample: &str) -> Result<Option<f64>, String> {
        let (status, body) = self.admin_get("/metrics").await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}: {body}"));
        }
        Ok(prometheus_sample(&body, sample))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Value of `sample` (name with labels, as printed) in Prometheus text.
pub fn prometheus_sample(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.starts_with(' ')
                .then(|| rest.split_whitespace().next())?
        })
        .and_then(|v| v.parse().ok())
}

/// A minimal HTTP/1.0 GET over loopback (no client dependency needed);
/// (status code, body). HTTP/1.0 keeps the server from chunking.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| format!("GET http://{addr}{path}: timed out"))?
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}{path}: malformed response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET http://{addr}{path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
