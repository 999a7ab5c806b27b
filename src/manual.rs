//! Manual pages and shell completions, written by the hidden
//! `telespool generate man|completions DIR` that `packaging/build` runs.
//!
//! - `telespool.1` comes from the clap definition (`cli.rs`): clap_mangen
//!   renders the top-level flags, and every subcommand gets a section with
//!   its own flags here.
//! - `telespool.toml.5` comes from the commented default config
//!   `packaging/telespool.toml` (compiled in): each key with its default (or
//!   its example, for keys that are commented out) and the comment above it.
//!   The page and the shipped config cannot drift, and a test checks that
//!   every key the parser accepts is in the page.
//! - Completions for bash, zsh and fish come from clap_complete.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;
use crate::config::env;

/// The commented default config, the source of `telespool.toml(5)`.
pub const DEFAULT_CONFIG: &str = include_str!("../packaging/telespool.toml");

/// Writes `telespool.1` and `telespool.toml.5` into `dir`.
pub fn write_man(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let pages = [
        ("telespool.1", command_page()?),
        ("telespool.toml.5", config_page()),
    ];
    let mut written = Vec::new();
    for (name, text) in pages {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `telespool.bash`, `_telespool` and `telespool.fish` into `dir`.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = Cli::command();
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            "telespool",
            dir,
        )?);
    }
    Ok(written)
}

/// Escapes text for a roff line: backslashes, minus signs, and a leading
/// `.` or `'` that would be read as a request.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    match escaped.starts_with(['.', '\'']) {
        true => format!("\\&{escaped}"),
        false => escaped,
    }
}

fn version() -> String {
    format!("telespool {}", env!("CARGO_PKG_VERSION"))
}

/// `telespool(1)`.
pub fn command_page() -> io::Result<String> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone())
        .date("")
        .source(version())
        .manual("User Commands");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    // No hyphenation: flags, keys and variables stay whole (and searchable).
    writeln!(out, ".nh\n.ad l")?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    writeln!(
        out,
        ".SH DESCRIPTION\n\
         telespool is a node\\-local OpenTelemetry agent. Applications send it traces, \
         metrics and logs over OTLP (gRPC on 127.0.0.1:4317, HTTP on 127.0.0.1:4318); it \
         batches them in a bounded buffer with backpressure and forwards them to an upstream \
         OTLP endpoint. Data it has acknowledged is kept in a SQLite spool across restarts and \
         upstream outages and replayed when it can be delivered.\n\
         .PP\n\
         Every setting lives in the TOML file given by \\fB\\-\\-config\\fR (see \
         \\fBtelespool.toml\\fR(5)); every key can also be set from the environment, and the \
         common ones by the flags below. Precedence: flag, environment, file, built\\-in default."
    )?;
    man.render_options_section(&mut out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        command_section(&mut out, "telespool", sub)?;
    }
    writeln!(
        out,
        ".SH ENVIRONMENT\n\
         .TP\n\\fBTELESPOOL_CONFIG\\fR\nThe config file, as \\fB\\-\\-config\\fR.\n\
         .TP\n\\fBTELESPOOL_\\fR\\fITABLE\\fR\\fB_\\fR\\fIKEY\\fR\n\
         Any config key: the dotted key in upper case with dots and dashes as underscores, \
         for example \\fBTELESPOOL_DURABILITY=spool\\fR or \
         \\fBTELESPOOL_UPSTREAM_RETRY_MAX_ELAPSED=10m\\fR. The value is checked like the \
         file's. A variable that names no key stops the start (exit status 2). See \
         \\fBtelespool.toml\\fR(5).\n\
         .TP\n\\fBRUST_LOG\\fR\nA tracing filter that wins over \\fBlog.level\\fR.\n\
         .TP\n\\fBSTATE_DIRECTORY\\fR\nSet by systemd; the default spool is \
         \\fI$STATE_DIRECTORY/spool.db\\fR.\n\
         .SH FILES\n\
         .TP\n\\fI/etc/telespool/telespool.toml\\fR\nThe packaged configuration.\n\
         .TP\n\\fI/var/lib/telespool/spool.db\\fR\nThe spool of the packaged service.\n\
         .TP\n\\fI/usr/share/telespool/monitoring/\\fR\nPrometheus alert rules and a Grafana \
         dashboard for the metrics on \\fBadmin.listen\\fR.\n\
         .SH EXIT STATUS\n\
         0 on success and after a clean shutdown; 1 when a shutdown had to drop data or \
         \\fBspool verify\\fR found problems; 2 for a bad configuration or a failed start; \
         3 when \\fBdrain\\fR ran out of time with rows left.\n\
         .SH SEE ALSO\n\\fBtelespool.toml\\fR(5), \\fBsystemctl\\fR(1)"
    )?;
    man.render_version_section(&mut out)?;
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One subcommand (and, nested, its own subcommands): synopsis, what it
/// does, its flags.
fn command_section(out: &mut Vec<u8>, parent: &str, cmd: &clap::Command) -> io::Result<()> {
    let name = format!("{parent} {}", cmd.get_name());
    let args: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_global_set())
        .collect();
    writeln!(out, ".SS \"{}\"", roff(&name))?;
    let about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|s| s.to_string())
        .unwrap_or_default();
    writeln!(out, "{}", roff(&about))?;
    for arg in args {
        let value = arg
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| v.to_string())
            .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
        let flag = match arg.get_long() {
            Some(long) if arg.get_action().takes_values() => {
                format!("\\fB\\-\\-{}\\fR \\fI{}\\fR", roff(long), roff(&value))
            }
            Some(long) => format!("\\fB\\-\\-{}\\fR", roff(long)),
            None => format!("\\fI{}\\fR", roff(&value)),
        };
        let mut help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        if let Some(default) = arg.get_default_values().first() {
            help.push_str(&format!(" [default: {}]", default.to_string_lossy()));
        }
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|p| p.get_name().to_owned())
            .collect();
        if !possible.is_empty() && arg.get_action().takes_values() {
            help.push_str(&format!(" [one of: {}]", possible.join(", ")));
        }
        writeln!(out, ".TP\n{flag}\n{}", roff(&help))?;
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        command_section(out, &name, sub)?;
    }
    Ok(())
}

/// One entry of the commented default config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Documented {
    /// Dotted path of a key, or of a `[table]`.
    pub path: String,
    /// True for a `[table]` heading.
    pub table: bool,
    /// `value` of `key = value`; for a key shown commented out (no default)
    /// the example value.
    pub value: Option<String>,
    /// Whether the key is commented out (its default is none).
    pub example: bool,
    /// The comment lines above (and right below) it.
    pub text: Vec<String>,
}

/// The tables and keys of a commented config such as [`DEFAULT_CONFIG`], in
/// order. The first entry (path "") is the file's opening comment.
pub fn documented(text: &str) -> Vec<Documented> {
    let mut out = vec![Documented {
        path: String::new(),
        table: true,
        value: None,
        example: false,
        text: Vec::new(),
    }];
    let mut table = String::new();
    let mut pending: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        if line.is_empty() {
            if let Some(last) = out.last_mut() {
                last.text.append(&mut pending);
            }
            continue;
        }
        if let Some(name) = table_heading(body) {
            if let Some(last) = out.last_mut() {
                last.text.append(&mut pending);
            }
            table = name.to_owned();
            out.push(Documented {
                path: table.clone(),
                table: true,
                value: None,
                example: commented,
                text: Vec::new(),
            });
            continue;
        }
        if let Some((key, value)) = assignment(body) {
            let path = match table.is_empty() {
                true => key.to_owned(),
                false => format!("{table}.{key}"),
            };
            out.push(Documented {
                path,
                table: false,
                value: Some(value.to_owned()),
                example: commented,
                text: std::mem::take(&mut pending),
            });
            continue;
        }
        pending.push(body.to_owned());
    }
    if let Some(last) = out.last_mut() {
        last.text.append(&mut pending);
    }
    out
}

fn table_heading(body: &str) -> Option<&str> {
    let name = body.strip_prefix('[')?.strip_suffix(']')?;
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    ok.then_some(name)
}

/// `key = value` with a bare lower-case key.
fn assignment(body: &str) -> Option<(&str, &str)> {
    let (key, value) = body.split_once('=')?;
    let key = key.trim();
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ok.then_some((key, value.trim()))
}

/// `telespool.toml(5)`, from [`DEFAULT_CONFIG`].
pub fn config_page() -> String {
    let entries = documented(DEFAULT_CONFIG);
    let keys = env::keys();
    let mut out = String::new();
    out.push_str(&format!(
        ".TH TELESPOOL.TOML 5 \"\" \"{}\" \"File Formats\"\n.nh\n.ad l\n\
         .SH NAME\ntelespool.toml \\- configuration of the telespool OpenTelemetry agent\n\
         .SH SYNOPSIS\n\\fI/etc/telespool/telespool.toml\\fR\n.SH DESCRIPTION\n",
        version()
    ));
    if let Some(intro) = entries.first() {
        for line in &intro.text {
            out.push_str(&roff(line));
            out.push('\n');
        }
    }
    out.push_str(
        ".SH ENVIRONMENT\n\
         Every key below can also be set by an environment variable: \\fBTELESPOOL_\\fR and \
         the dotted key in upper case, dots and dashes as underscores (\\fBbuffer.max_bytes\\fR \
         is \\fBTELESPOOL_BUFFER_MAX_BYTES\\fR). The value is read as a TOML value when it is \
         one (\\fB8192\\fR, \\fBtrue\\fR, \\fB[\"https://app.example.com\"]\\fR) and as a \
         string otherwise (\\fB64MiB\\fR, \\fBhttp://gw.example:4317\\fR), and checked like \
         the file's. A table of free\\-form keys such as \\fBupstream.headers\\fR is an inline \
         TOML table that replaces the file's: \
         \\fBTELESPOOL_UPSTREAM_HEADERS='{ \"x\\-api\\-key\" = \"secret\" }'\\fR. An empty \
         variable restores the built\\-in default. A \\fBTELESPOOL_*\\fR variable that names no \
         key stops the start, naming the closest key. Precedence: flag, environment, file, \
         default; \\fBtelespool check\\-config \\-\\-show\\-origin\\fR shows where each value \
         came from.\n.SH KEYS\n",
    );
    let map_var = |path: &str| {
        keys.iter()
            .find(|k| k.path == path && k.kind == env::KeyKind::Map)
            .map(|k| k.env_var())
    };
    let mut in_map: Option<String> = None;
    for entry in entries.iter().skip(1) {
        if let Some(map) = in_map
            .as_deref()
            .filter(|m| entry.path.starts_with(&format!("{m}.")))
        {
            // An example entry of a free-form table.
            let key = &entry.path[map.len() + 1..];
            let value = entry.value.as_deref().unwrap_or("");
            out.push_str(&format!(
                ".RS\nExample entry: {} = {}\n.RE\n",
                roff(key),
                roff(value)
            ));
            continue;
        }
        in_map = None;
        if let (true, Some(var)) = (entry.table, map_var(&entry.path)) {
            // A table of free-form keys is one key.
            out.push_str(&format!(
                ".TP\n.B {}\nDefault: empty. A table of free\\-form keys. Environment: \\fB{}\\fR \
                 (an inline table).\n",
                roff(&entry.path),
                roff(&var)
            ));
            for line in &entry.text {
                out.push_str(&roff(line));
                out.push('\n');
            }
            in_map = Some(entry.path.clone());
            continue;
        }
        if entry.table {
            out.push_str(&format!(".SS \"[{}]\"\n", roff(&entry.path)));
            for line in &entry.text {
                out.push_str(&roff(line));
                out.push('\n');
            }
            continue;
        }
        out.push_str(&format!(".TP\n.B {}\n", roff(&entry.path)));
        let value = entry.value.as_deref().unwrap_or("");
        let var = keys
            .iter()
            .find(|k| k.path == entry.path)
            .map(|k| k.env_var());
        match entry.example {
            true => out.push_str(&format!("Default: none. Example: {}.", roff(value))),
            false => out.push_str(&format!("Default: {}.", roff(value))),
        }
        if let Some(var) = var {
            out.push_str(&format!(" Environment: \\fB{}\\fR.", roff(&var)));
        }
        out.push('\n');
        for line in &entry.text {
            out.push_str(&roff(line));
            out.push('\n');
        }
    }
    out.push_str(".SH SEE ALSO\n\\fBtelespool\\fR(1)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_page_lists_every_key_the_parser_accepts() {
        let page = config_page();
        let missing: Vec<String> = env::keys()
            .into_iter()
            .filter(|k| !page.contains(&format!(".B {}\n", roff(&k.path))))
            .map(|k| k.path)
            .collect();
        assert!(
            missing.is_empty(),
            "keys missing from packaging/telespool.toml (and so from telespool.toml(5)): {missing:?}"
        );
    }

    #[test]
    fn every_key_the_default_config_documents_is_accepted_by_the_parser() {
        let keys = env::keys();
        for entry in documented(DEFAULT_CONFIG).iter().filter(|e| !e.table) {
            let known = keys.iter().any(|k| {
                k.path == entry.path
                    || (k.kind == env::KeyKind::Map
                        && entry.path.starts_with(&format!("{}.", k.path)))
            });
            assert!(known, "{} is documented but not a key", entry.path);
        }
    }

    #[test]
    fn documented_entries_carry_defaults_examples_and_comments() {
        let entries = documented(DEFAULT_CONFIG);
        let get = |path: &str| entries.iter().find(|e| e.path == path).expect(path);
        let max_bytes = get("buffer.max_bytes");
        assert_eq!(max_bytes.value.as_deref(), Some("\"64MiB\""));
        assert!(!max_bytes.example);
        assert!(max_bytes.text.join(" ").contains("Memory bound"));
        let endpoint = get("upstream.endpoint");
        assert!(endpoint.example, "commented out: no default");
        assert!(get("receiver.tls").table);
    }

    #[test]
    fn the_command_page_has_every_subcommand_and_flag() {
        let page = command_page().expect("renders");
        for needle in [
            "telespool check\\-config",
            "\\-\\-show\\-origin",
            "telespool spool purge",
            "\\-\\-yes",
            "telespool drain",
            "\\-\\-timeout",
            "\\-\\-upstream",
            "\\-\\-admin\\-listen",
            "telespool spool export",
            "\\-\\-signal",
        ] {
            assert!(page.contains(needle), "{needle} not in telespool.1");
        }
        assert!(
            !page.contains("generate"),
            "the hidden command stays hidden"
        );
    }
}
