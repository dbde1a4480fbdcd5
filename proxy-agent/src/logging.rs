//! The agent's log output: tracing's fmt layer on stderr, through a writer that escapes
//! control characters, so that one event is one line whatever its fields hold. A Service
//! name or a file name with a newline and terminal escapes (input the agent does not
//! control) cannot write a line of its own or repaint a terminal. tracing-subscriber escapes
//! ESC and a few others in field values, not newlines; escaping the formatted line covers
//! every field and the message, in any format.

use std::io::{self, IsTerminal as _, Write};

use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `TIMESTAMP LEVEL target: message key=value ...`, colours only on a terminal.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level, with the same names as in the text form.
    Json,
}

/// Logs to stderr, `RUST_LOG` filtering (default `info`); the programs' forwarded records
/// pass at every level unless it names their target (`--bpf-log-level` chooses them).
pub fn init(format: Format) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| tracing_subscriber::EnvFilter::try_new(d).is_ok())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::new(crate::bpf_log::with_bpf_target(&directives));
    match format {
        Format::Text => {
            let ansi = io::stderr().is_terminal();
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(EscapedStderr { ansi, json: false })
                .with_ansi(ansi)
                .init();
        }
        // serde_json escapes C0 controls in strings, not DEL nor C1 controls: the writer
        // writes those as JSON escapes, so a line stays one valid JSON object.
        Format::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(filter)
            .with_writer(EscapedStderr {
                ansi: false,
                json: true,
            })
            .init(),
    }
}

/// The line a command's error ends with: `error: what failed: cause: ...` (anyhow's `{:#}`),
/// or in JSON, an `ERROR` object with the same text as its `message`. Escaped as log lines are.
pub fn error_line(format: Format, error: &str) -> String {
    let error = error.trim_end();
    let line = match format {
        Format::Text => escape(format!("error: {error}").as_bytes(), false),
        Format::Json => escape_json(
            serde_json::json!({
                "timestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
                "level": "ERROR",
                "message": error,
                "target": "proxy_agent",
            })
            .to_string()
            .as_bytes(),
        ),
    };
    String::from_utf8_lossy(&line).into_owned()
}

/// Stderr, escaped (see the module's doc).
struct EscapedStderr {
    /// The formatter writes colours: ESC is left alone (tracing-subscriber escapes it in
    /// field values itself).
    ansi: bool,
    /// Lines are JSON objects: escapes are JSON's.
    json: bool,
}

impl<'a> MakeWriter<'a> for EscapedStderr {
    type Writer = Escaping<io::StderrLock<'static>>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping {
            inner: io::stderr().lock(),
            keep_esc: self.ansi,
            json: self.json,
        }
    }
}

/// Escapes what it is given, one formatted event per write (tracing-subscriber's fmt layer
/// formats an event into a buffer and writes it at once): its final newline stays.
pub struct Escaping<W> {
    inner: W,
    keep_esc: bool,
    json: bool,
}

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let escaped = if self.json {
            escape_json(buf)
        } else {
            escape(buf, self.keep_esc)
        };
        self.inner.write_all(&escaped)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `line` with C0 controls (but tab), DEL and C1 controls written as `\n`, `\r` or `\xNN`,
/// except a final newline (and ESC with `keep_esc`).
pub fn escape(line: &[u8], keep_esc: bool) -> Vec<u8> {
    escape_controls(line, |c, out| match c {
        0x0a => out.extend_from_slice(b"\\n"),
        0x0d => out.extend_from_slice(b"\\r"),
        0x09 => out.push(b'\t'),
        0x1b if keep_esc => out.push(0x1b),
        0x00..=0x7f => out.extend_from_slice(format!("\\x{c:02x}").as_bytes()),
        _ => out.extend_from_slice(format!("\\u{{{c:x}}}").as_bytes()),
    })
}

/// A JSON line with the controls serde_json leaves (DEL, C1) and any C0 control written as
/// `\u00XX`, except a final newline. In a JSON line such bytes are inside strings, where
/// that escape means the same character.
pub fn escape_json(line: &[u8]) -> Vec<u8> {
    escape_controls(line, |c, out| {
        out.extend_from_slice(format!("\\u{c:04x}").as_bytes());
    })
}

/// `line` with each control character (C0, DEL, C1: U+0000..U+001F, U+007F..U+009F) written
/// by `write`, except a final newline.
fn escape_controls(line: &[u8], mut write: impl FnMut(u32, &mut Vec<u8>)) -> Vec<u8> {
    let (body, newline) = match line.strip_suffix(b"\n") {
        Some(body) => (body, true),
        None => (line, false),
    };
    let mut out = Vec::with_capacity(line.len() + 8);
    let mut bytes = body.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            0x00..=0x1f | 0x7f => write(u32::from(b), &mut out),
            // C1 controls, U+0080..U+009F, are 0xC2 0x80..=0x9F in UTF-8.
            0xc2 if bytes.peek().is_some_and(|n| (0x80..=0x9f).contains(n)) => {
                let n = bytes.next().unwrap_or_default();
                write(u32::from(n), &mut out);
            }
            _ => out.push(b),
        }
    }
    if newline {
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field holding DEL and C1 controls (a manifest file's name): the JSON line still
    /// parses, to the same text, and holds no raw control.
    #[test]
    fn a_json_line_with_del_and_c1_controls_stays_valid_json() {
        let name = "web\u{7f}\u{9b}2J\u{1b}[31m\nfake";
        let line = format!("{}\n", serde_json::json!({"origin": name}));
        let escaped = escape_json(line.as_bytes());
        let text = String::from_utf8(escaped).unwrap();
        assert!(!text.trim_end().chars().any(char::is_control), "{text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["origin"], name);
        assert!(text.ends_with('\n'));
        let e = error_line(Format::Json, &format!("{name}\n"));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["message"], name);
        assert!(v["timestamp"].is_string() && v["target"].is_string(), "{e}");
    }

    #[test]
    fn control_characters_from_input_cannot_make_a_line_of_their_own() {
        let event =
            "WARN name=web\n2026-12-02T00:00:00Z  INFO forged\r\x1b[2J\u{9b}31m\x07 end\tok\n";
        let got = String::from_utf8(escape(event.as_bytes(), false)).unwrap();
        assert_eq!(
            got,
            "WARN name=web\\n2026-12-02T00:00:00Z  INFO forged\\r\\x1b[2J\\u{9b}31m\\x07 end\tok\n"
        );
        assert_eq!(got.lines().count(), 1);
        // Colours on a terminal: ESC stays, the rest is escaped as before.
        let got = String::from_utf8(escape(b"\x1b[33mWARN\x1b[0m a\nb\n", true)).unwrap();
        assert_eq!(got, "\x1b[33mWARN\x1b[0m a\\nb\n");
        // Not UTF-8 (a file name can be anything): bytes pass through, controls escaped.
        assert_eq!(escape(b"\xff\xc2\n", false), b"\xff\xc2\n");
    }

    #[test]
    fn tracing_events_go_out_escaped_one_line_each() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Escaping {
                inner: sink.clone(),
                keep_esc: false,
                json: false,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let name = "web\n2026-12-02T00:00:00.000000Z  INFO proxy_agent: forged";
            tracing::warn!(name = %name, origin = ?"/m/a\nb.yaml", "rejected {}", name);
            tracing::info!("second");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("name=web\\n2026"), "{text}");
        assert!(lines[1].ends_with("second"), "{text}");
    }
}
