//! The post-text rules: what a post's text may hold, checked where a post enters the system.
//!
//! A stored post is at most [`MAX_POST_BYTES`] of UTF-8, one line, with no character a
//! terminal acts on (tab excepted) and no bidirectional override: clients print posts
//! verbatim, so an escape sequence in a post would run in every follower's terminal.

use crate::error::{Error, Result};

/// Longest post text accepted, in bytes of UTF-8.
pub const MAX_POST_BYTES: usize = 4096;

/// Checks a post's text: strips one trailing newline (and a `\r` before it), rejects text over
/// [`MAX_POST_BYTES`], with an inner line break or with a terminal control character (see
/// [`check_post_text`]). Returns `None` for an empty line (ignored).
pub fn normalize_post_text(raw: &[u8]) -> Result<Option<&str>> {
    let text =
        std::str::from_utf8(raw).map_err(|_| Error::invalid("post text is not valid UTF-8"))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    check_post_text(text)?;
    Ok((!text.is_empty()).then_some(text))
}

/// Checks the text of a post as stored: at most [`MAX_POST_BYTES`], one line, and no terminal
/// control character (see [`is_terminal_control`]), since clients print posts verbatim and an
/// escape sequence in a post would be run by every follower's terminal.
pub fn check_post_text(text: &str) -> Result<()> {
    if text.len() > MAX_POST_BYTES {
        return Err(Error::invalid(format!(
            "post is {} bytes; the limit is {MAX_POST_BYTES}",
            text.len()
        )));
    }
    if text.contains(['\n', '\r']) {
        return Err(Error::invalid("post text must be a single line"));
    }
    if let Some(control) = text.chars().find(|c| is_terminal_control(*c)) {
        return Err(Error::invalid(format!(
            "post text contains the control character U+{:04X}; posts may not carry terminal \
             control characters or bidirectional overrides (only tab is allowed)",
            u32::from(control)
        )));
    }
    Ok(())
}

/// Whether `c` is a character a terminal acts on or that reorders what it shows: C0 controls
/// except tab, DEL, C1 controls (U+0080 to U+009F; U+009B is a CSI on many terminals), and the
/// bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to U+2069: the
/// "Trojan Source" trick, CVE-2021-42574).
pub fn is_terminal_control(c: char) -> bool {
    (c.is_control() && c != '\t')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_text_is_normalized() {
        assert_eq!(normalize_post_text(b"hi\n").ok().flatten(), Some("hi"));
        assert_eq!(normalize_post_text(b"hi\r\n").ok().flatten(), Some("hi"));
        assert_eq!(normalize_post_text(b"hi").ok().flatten(), Some("hi"));
        assert!(matches!(normalize_post_text(b"\n"), Ok(None)));
        assert!(matches!(normalize_post_text(b""), Ok(None)));
        assert!(normalize_post_text(b"a\nb").is_err());
        assert!(normalize_post_text(&[0xff, 0xfe]).is_err());
        assert!(normalize_post_text(&[b'x'; MAX_POST_BYTES]).is_ok());
        assert!(normalize_post_text(&[b'x'; MAX_POST_BYTES + 1]).is_err());
        // Terminal control characters are refused, wherever they are; tab and the trailing
        // newline are not.
        assert_eq!(normalize_post_text(b"a\tb\n").ok().flatten(), Some("a\tb"));
        for bad in [
            &b"\x1b[2J"[..],
            b"ring\x07",
            b"nul\x00",
            b"del\x7f",
            b"\x1b]0;title\x07\n",
            b"back\x08space",
        ] {
            let refused = normalize_post_text(bad);
            assert!(
                matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("control character")),
                "{bad:?}: {refused:?}"
            );
        }
        // Other text, accents and emoji included, passes.
        assert!(normalize_post_text("café 🙂".as_bytes()).is_ok());
    }
}
