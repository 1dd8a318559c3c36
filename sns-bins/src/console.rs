//! The client's console: lines in, lines out, without garbling.
//!
//! On a terminal, `rustyline` reads lines (editing, history) on its own thread, and output that
//! arrives while a line is being typed goes through its external printer, which redraws the
//! prompt and the partial line below it. With stdin not a terminal (piped commands), lines are
//! read plainly and output is printed as is, so the same lines appear.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};

use rustyline::ExternalPrinter;
use tokio::sync::mpsc;

/// One input event.
#[derive(Debug)]
pub enum Input {
    /// A line, without its newline.
    Line(String),
    /// A line that is not UTF-8 text; it is dropped, and reading goes on.
    NotText,
    /// End of input (Ctrl-D or end of the pipe) or Ctrl-C.
    End,
}

type Printer = Arc<Mutex<Box<dyn ExternalPrinter + Send>>>;

/// Where lines come from and go to.
pub struct Console {
    prompts: std::sync::mpsc::Sender<String>,
    lines: mpsc::Receiver<Input>,
    printer: Option<Printer>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("terminal", &self.printer.is_some())
            .finish()
    }
}

/// Prints lines from any task without garbling the line being typed.
#[derive(Clone)]
pub struct Output {
    printer: Option<Printer>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("terminal", &self.printer.is_some())
            .finish()
    }
}

impl Output {
    /// Prints a message about the client itself (e.g. a reconnect), not part of the course's
    /// output: on a terminal like [`Output::line`], otherwise on stderr, so piped stdout holds
    /// exactly the course's lines.
    pub fn notice(&self, line: &str) {
        if self.printer.is_some() {
            self.line(line);
        } else {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
            let _ = err.flush();
        }
    }

    /// Prints `line` (a newline is added).
    pub fn line(&self, line: &str) {
        if let Some(printer) = &self.printer
            && let Ok(mut printer) = printer.lock()
            && printer.print(format!("{line}\n")).is_ok()
        {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// A piped line's bytes as input: the text without its line ending, or [`Input::NotText`].
fn plain_line(mut bytes: Vec<u8>) -> Input {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    match String::from_utf8(bytes) {
        Ok(line) => Input::Line(line),
        Err(_) => Input::NotText,
    }
}

impl Console {
    /// Opens the console: a line editor on a terminal, plain reads otherwise.
    pub fn open() -> Self {
        let (prompts, prompt_rx) = std::sync::mpsc::channel::<String>();
        let (line_tx, lines) = mpsc::channel(16);
        let mut printer = None;
        if std::io::stdin().is_terminal()
            && let Ok(mut editor) = rustyline::DefaultEditor::new()
        {
            if let Ok(external) = editor.create_external_printer() {
                let boxed: Box<dyn ExternalPrinter + Send> = Box::new(external);
                printer = Some(Arc::new(Mutex::new(boxed)));
            }
            std::thread::spawn(move || {
                while let Ok(prompt) = prompt_rx.recv() {
                    let input = match editor.readline(&prompt) {
                        Ok(line) => {
                            if !line.trim().is_empty() {
                                let _ = editor.add_history_entry(line.as_str());
                            }
                            Input::Line(line)
                        }
                        // rustyline reports bytes that are not UTF-8 as invalid data.
                        Err(rustyline::error::ReadlineError::Io(e))
                            if e.kind() == std::io::ErrorKind::InvalidData =>
                        {
                            Input::NotText
                        }
                        // Ctrl-D and Ctrl-C end the session as end of input does.
                        Err(
                            rustyline::error::ReadlineError::Eof
                            | rustyline::error::ReadlineError::Interrupted,
                        ) => Input::End,
                        Err(e) => {
                            eprintln!("tsc: cannot read the terminal ({e}); logging out");
                            Input::End
                        }
                    };
                    let end = matches!(input, Input::End);
                    if line_tx.blocking_send(input).is_err() || end {
                        break;
                    }
                }
            });
        } else {
            std::thread::spawn(move || {
                let stdin = std::io::stdin();
                let mut reader = stdin.lock();
                while prompt_rx.recv().is_ok() {
                    let mut bytes = Vec::new();
                    let input = match reader.read_until(b'\n', &mut bytes) {
                        Ok(0) | Err(_) => Input::End,
                        Ok(_) => plain_line(bytes),
                    };
                    let end = matches!(input, Input::End);
                    if line_tx.blocking_send(input).is_err() || end {
                        break;
                    }
                }
            });
        }
        Self {
            prompts,
            lines,
            printer,
        }
    }

    /// Whether input comes from a terminal.
    pub fn is_terminal(&self) -> bool {
        self.printer.is_some()
    }

    /// A handle for printing from other tasks.
    pub fn output(&self) -> Output {
        Output {
            printer: self.printer.clone(),
        }
    }

    /// Reads the next line, showing `prompt` on a terminal.
    pub async fn read(&mut self, prompt: &str) -> Input {
        let prompt = if self.is_terminal() { prompt } else { "" };
        if self.prompts.send(prompt.to_string()).is_err() {
            return Input::End;
        }
        self.lines.recv().await.unwrap_or(Input::End)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piped_lines_lose_their_ending_and_bytes_that_are_not_utf8_are_no_text() {
        assert!(matches!(plain_line(b"FOLLOW 2\r\n".to_vec()), Input::Line(l) if l == "FOLLOW 2"));
        assert!(matches!(plain_line(b"last".to_vec()), Input::Line(l) if l == "last"));
        assert!(
            matches!(plain_line("h\u{e9}\n".as_bytes().to_vec()), Input::Line(l) if l == "h\u{e9}")
        );
        assert!(matches!(plain_line(b"caf\xe9\n".to_vec()), Input::NotText));
        assert!(matches!(plain_line(b"\xff\xfe".to_vec()), Input::NotText));
    }
}
