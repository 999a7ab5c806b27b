//! `telespool top`: a live full-screen view of a running agent, fed by the
//! admin API's `Watch` stream.
//!
//! The screen is a pure function of the last two snapshots ([`view`]); this
//! file only moves data: snapshots in from the stream, keys in from a thread
//! reading the terminal, frames out. The terminal is put back (raw mode off,
//! main screen, cursor shown) on every way out: `q`, Esc, Ctrl-C (a key in raw
//! mode), SIGINT/SIGTERM/SIGHUP, an error, and a panic (ratatui's hook). A lost
//! connection is shown on screen and retried every second; it is not an exit.
//!
//! `--once` prints one frame as plain text: it takes two snapshots one
//! interval apart, so the rates are real.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc;

use crate::api::Status;
use crate::commands::admin_client as client;
use crate::commands::CommandError;

pub mod draw;
pub mod view;

#[cfg(test)]
mod tests;

use view::{Connection, View};

/// How long `top` waits before reconnecting after the stream was lost.
const RETRY: Duration = Duration::from_secs(1);

/// `telespool top --once`: one frame as plain text.
pub async fn once(addr: SocketAddr, interval: Duration) -> Result<String, CommandError> {
    let interval = crate::admin::grpc::watch_interval(millis(interval));
    let mut stream = client::watch(addr, interval).await?;
    let deadline = interval + client::TIMEOUT;
    let Some(first) = next(addr, &mut stream, deadline).await? else {
        return Err(CommandError::Unreachable {
            addr,
            cause: "the agent ended the stream before the first snapshot (shutting down?)".into(),
        });
    };
    let (prev, cur) = match next(addr, &mut stream, deadline).await? {
        Some(second) => (Some(first), second),
        None => (None, first),
    };
    let v = View::new(
        &addr.to_string(),
        prev.as_ref(),
        &cur,
        Connection::Live,
        interval,
    );
    Ok(draw::text(&v))
}

/// The next snapshot of `stream`, within `deadline`.
async fn next(
    addr: SocketAddr,
    stream: &mut tonic::Streaming<Status>,
    deadline: Duration,
) -> Result<Option<Status>, CommandError> {
    match tokio::time::timeout(deadline, stream.message()).await {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(status)) => Err(client::api_error(addr, status)),
        Err(_) => Err(CommandError::Unreachable {
            addr,
            cause: format!("no snapshot within {deadline:?}"),
        }),
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// What the stream side of the loop produced. One lives at a time, on the
/// stack of one loop turn, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Next {
    Message(Result<Option<Status>, tonic::Status>),
    Connected(Result<tonic::Streaming<Status>, CommandError>),
}

/// What the keyboard side of the loop produced.
enum Input {
    Quit,
    Redraw,
}

/// `telespool top`: run the full-screen view until the user quits.
pub async fn run(addr: SocketAddr, interval: Duration) -> Result<(), CommandError> {
    if !std::io::stdout().is_terminal() {
        return Err(CommandError::NotATerminal);
    }
    let interval = crate::admin::grpc::watch_interval(millis(interval));
    let mut terminal = Screen::enter();
    let (keys_tx, mut keys) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("top keys".into())
        .spawn(move || read_keys(keys_tx))
        .map_err(CommandError::Stdout)?;
    let mut signals = Signals::new()?;

    let name = addr.to_string();
    let mut prev: Option<Status> = None;
    let mut cur: Option<Status> = None;
    let mut connection = Connection::Connecting;
    let mut stream: Option<tonic::Streaming<Status>> = None;
    loop {
        terminal.draw(&name, prev.as_ref(), cur.as_ref(), &connection, interval)?;
        let next = async {
            match stream.as_mut() {
                Some(s) => Next::Message(s.message().await),
                None => {
                    if !matches!(connection, Connection::Connecting) {
                        tokio::time::sleep(RETRY).await;
                    }
                    Next::Connected(client::watch(addr, interval).await)
                }
            }
        };
        tokio::select! {
            input = keys.recv() => match input {
                Some(Input::Quit) | None => break,
                Some(Input::Redraw) => continue,
            },
            _ = signals.recv() => break,
            next = next => match next {
                Next::Message(Ok(Some(snapshot))) => {
                    prev = cur.take();
                    cur = Some(snapshot);
                    connection = Connection::Live;
                }
                Next::Message(Ok(None)) => {
                    stream = None;
                    connection = Connection::Lost("the agent ended the stream (shut down?)".into());
                }
                Next::Message(Err(status)) => {
                    stream = None;
                    connection = Connection::Lost(client::api_error(addr, status).to_string());
                }
                Next::Connected(Ok(s)) => {
                    stream = Some(s);
                    // Rates across a gap could mix two agent lifetimes.
                    prev = None;
                }
                Next::Connected(Err(e)) => connection = Connection::Lost(e.to_string()),
            },
        }
    }
    drop(terminal);
    Ok(())
}

/// The terminal in raw mode on the alternate screen; restored on drop.
struct Screen {
    terminal: ratatui::DefaultTerminal,
}

impl Screen {
    fn enter() -> Screen {
        // Installs a panic hook that restores the terminal too.
        Screen {
            terminal: ratatui::init(),
        }
    }

    fn draw(
        &mut self,
        addr: &str,
        prev: Option<&Status>,
        cur: Option<&Status>,
        connection: &Connection,
        interval: Duration,
    ) -> Result<(), CommandError> {
        let empty = Status::default();
        let v = View::new(
            addr,
            prev,
            cur.unwrap_or(&empty),
            connection.clone(),
            interval,
        );
        self.terminal
            .draw(|f| draw::draw(f, &v))
            .map_err(CommandError::Stdout)?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Reads the terminal on its own thread (crossterm's reads block); ends when
/// the loop is gone.
fn read_keys(tx: mpsc::Sender<Input>) {
    loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(false) => {
                if tx.is_closed() {
                    return;
                }
                continue;
            }
            Ok(true) => {}
            Err(_) => {
                let _ = tx.blocking_send(Input::Quit);
                return;
            }
        }
        let input = match event::read() {
            Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => match k.code {
                KeyCode::Char('q') | KeyCode::Esc => Input::Quit,
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Input::Quit,
                _ => continue,
            },
            Ok(Event::Resize(..)) => Input::Redraw,
            Ok(_) => continue,
            Err(_) => Input::Quit,
        };
        let quit = matches!(input, Input::Quit);
        if tx.blocking_send(input).is_err() || quit {
            return;
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP: quit (and so restore the terminal).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, CommandError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(CommandError::Stdout)?,
            term: signal(SignalKind::terminate()).map_err(CommandError::Stdout)?,
            hup: signal(SignalKind::hangup()).map_err(CommandError::Stdout)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}
