//! The course client's command language and its exact output strings (DESIGN §4).

use sns_core::{Error, ReceivedPost, UserId};

/// The banner printed after login (the prompt `Cmd> ` follows it).
pub const BANNER: &str = "========= TINY SNS CLIENT =========\n Command Lists and Format:\n FOLLOW <username>\n UNFOLLOW <username>\n LIST\n TIMELINE\n=====================================";
/// The command-mode prompt.
pub const PROMPT: &str = "Cmd> ";
/// A command succeeded.
pub const SUCCESS: &str = "Command completed successfully";
/// Already following, or following yourself.
pub const ALREADY_EXISTS: &str = "Input username already exists, command failed";
/// The named user does not exist.
pub const NOT_EXISTS: &str = "Input username does not exists, command failed";
/// Unknown or malformed user; unfollowing yourself.
pub const INVALID_USERNAME: &str = "Command failed with invalid username";
/// Unfollowing someone you do not follow.
pub const NOT_A_FOLLOWER: &str = "Command failed with not a follower";
/// The server refused the command as such.
pub const INVALID_COMMAND: &str = "Command failed with invalid command";
/// Anything else.
pub const UNKNOWN_REASON: &str = "Command failed with unknown reason";
/// FOLLOW or UNFOLLOW without an argument.
pub const NO_ARGUMENTS: &str = "Invalid Input -- No Arguments Given";
/// Words after a command's arguments (FOLLOW takes one, LIST and TIMELINE none).
pub const EXTRA_WORDS: &str = "Invalid Input -- Too Many Arguments";
/// A first word that is no command.
pub const UNKNOWN_COMMAND: &str = "Invalid Command";
/// Printed on entering timeline mode.
pub const IN_TIMELINE: &str = "Now you are in the timeline";

/// A command typed in command mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `FOLLOW <username>` (the argument as typed).
    Follow(String),
    /// `UNFOLLOW <username>` (the argument as typed).
    Unfollow(String),
    /// `LIST`.
    List,
    /// `TIMELINE`.
    Timeline,
}

/// Why a line is not a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// FOLLOW or UNFOLLOW without its argument.
    NoArguments,
    /// An unknown first word.
    UnknownCommand,
    /// Words after the command's arguments (e.g. `FOLLOW 1 4`, `TIMELINE now`): refused rather
    /// than ignored, so nothing is done that was not meant (timeline mode has no way back).
    ExtraWords,
}

impl ParseError {
    /// The line the course client prints.
    pub fn message(self) -> &'static str {
        match self {
            Self::NoArguments => NO_ARGUMENTS,
            Self::UnknownCommand => UNKNOWN_COMMAND,
            Self::ExtraWords => EXTRA_WORDS,
        }
    }
}

/// Parses one line; `None` for a blank line. The first word is case-insensitive.
pub fn parse_command(line: &str) -> Option<Result<Command, ParseError>> {
    let mut words = line.split_whitespace();
    let first = words.next()?.to_ascii_uppercase();
    let argument = words.next().map(str::to_string);
    let with_argument =
        |make: fn(String) -> Command| argument.clone().map(make).ok_or(ParseError::NoArguments);
    let command = match first.as_str() {
        "FOLLOW" => with_argument(Command::Follow),
        "UNFOLLOW" => with_argument(Command::Unfollow),
        "LIST" => Ok(Command::List),
        "TIMELINE" => Ok(Command::Timeline),
        _ => Err(ParseError::UnknownCommand),
    };
    let takes_argument = matches!(first.as_str(), "FOLLOW" | "UNFOLLOW");
    let extra = if takes_argument {
        words.next().is_some()
    } else {
        argument.is_some()
    };
    Some(match command {
        Ok(_) if extra => Err(ParseError::ExtraWords),
        other => other,
    })
}

/// The line printed when `command` failed with `error`.
pub fn failure_message(command: &Command, error: &Error) -> String {
    match (command, error) {
        (Command::Follow(_), Error::SameClient | Error::AlreadyFollowing) => ALREADY_EXISTS.into(),
        (Command::Unfollow(_), Error::SameClient) => INVALID_USERNAME.into(),
        (_, Error::InvalidUsername(_)) => INVALID_USERNAME.into(),
        (_, Error::NotFollowing) => NOT_A_FOLLOWER.into(),
        (_, Error::InvalidInput(_)) => INVALID_COMMAND.into(),
        (_, e) if e.calls_for_reconnect() => format!("{UNKNOWN_REASON} ({e})"),
        (_, Error::Rpc(reason)) => format!("{UNKNOWN_REASON} ({reason})"),
        (_, Error::OverLimit(limit)) => format!("Command failed: {limit}"),
        _ => UNKNOWN_REASON.into(),
    }
}

/// A post as our client shows it: exactly the course's line, `<author> (<Www Mmm dd hh:mm:ss
/// yyyy>) >> <text>`, with the time in the reader's local time zone, so that output compares
/// line by line with the course's test sheets. Any control character in the text (whatever the
/// server let through) is shown escaped (`\u{1b}`), never sent to the terminal. The server's
/// pre-formatted text for course clients stays in UTC, as the course's servers wrote it.
pub fn local_post_line(post: &ReceivedPost) -> String {
    let time = chrono::DateTime::from_timestamp_micros(post.at.0)
        .map(|utc| local_time(&utc.with_timezone(&chrono::Local)))
        .unwrap_or_else(|| post.at.ctime());
    format!("{} ({time}) >> {}", post.author, terminal_safe(&post.text))
}

/// `time` as C's `ctime` lays it out: `Www Mmm dd hh:mm:ss yyyy`, the day padded with a space.
fn local_time<Tz: chrono::TimeZone>(time: &chrono::DateTime<Tz>) -> String
where
    Tz::Offset: std::fmt::Display,
{
    time.format("%a %b %e %H:%M:%S %Y").to_string()
}

/// `text` with every character a terminal would act on (see
/// [`sns_core::event::is_terminal_control`]) written as a `\u{..}` escape, and backslashes
/// doubled so that an escape in the text cannot pass for one.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    if !text
        .chars()
        .any(|c| c == '\\' || sns_core::event::is_terminal_control(c))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut safe = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\\' {
            safe.push_str("\\\\");
        } else if sns_core::event::is_terminal_control(c) {
            let _ = write!(safe, "\\u{{{:x}}}", u32::from(c));
        } else {
            safe.push(c);
        }
    }
    std::borrow::Cow::Owned(safe)
}

/// A list of users as the course prints it: each id followed by `, `.
pub fn user_list(users: &[UserId]) -> String {
    users.iter().map(|u| format!("{u}, ")).collect()
}

/// Parses the argument of FOLLOW/UNFOLLOW; a malformed one is an invalid username.
pub fn parse_target(argument: &str) -> Result<UserId, Error> {
    UserId::parse(argument)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(
            parse_command("follow 4"),
            Some(Ok(Command::Follow("4".into())))
        );
        assert_eq!(
            parse_command("  UnFollow   12 "),
            Some(Ok(Command::Unfollow("12".into())))
        );
        assert_eq!(parse_command("list"), Some(Ok(Command::List)));
        assert_eq!(parse_command("TIMELINE"), Some(Ok(Command::Timeline)));
        assert_eq!(parse_command("FOLLOW"), Some(Err(ParseError::NoArguments)));
        assert_eq!(
            parse_command("post hi"),
            Some(Err(ParseError::UnknownCommand))
        );
        assert_eq!(parse_command("   "), None);
    }

    #[test]
    fn words_after_the_arguments_are_refused() {
        for line in [
            "FOLLOW 1 4",
            "unfollow 2 please",
            "LIST all",
            "TIMELINE now",
        ] {
            assert_eq!(
                parse_command(line),
                Some(Err(ParseError::ExtraWords)),
                "{line}"
            );
        }
        assert_eq!(ParseError::ExtraWords.message(), EXTRA_WORDS);
        // Spaces alone are no words.
        assert_eq!(parse_command("TIMELINE   "), Some(Ok(Command::Timeline)));
        assert_eq!(
            parse_command("FOLLOW 4  "),
            Some(Ok(Command::Follow("4".into())))
        );
    }

    #[test]
    fn failures_use_the_course_strings() {
        let follow = Command::Follow("1".into());
        let unfollow = Command::Unfollow("1".into());
        assert_eq!(failure_message(&follow, &Error::SameClient), ALREADY_EXISTS);
        assert_eq!(
            failure_message(&follow, &Error::AlreadyFollowing),
            ALREADY_EXISTS
        );
        assert_eq!(
            failure_message(&follow, &Error::InvalidUsername("x".into())),
            INVALID_USERNAME
        );
        assert_eq!(
            failure_message(&unfollow, &Error::SameClient),
            INVALID_USERNAME
        );
        assert_eq!(
            failure_message(&unfollow, &Error::NotFollowing),
            NOT_A_FOLLOWER
        );
        assert_eq!(
            failure_message(&unfollow, &Error::Rpc("the reply is too large".into())),
            format!("{UNKNOWN_REASON} (the reply is too large)")
        );
        assert_eq!(
            failure_message(&unfollow, &Error::Corrupt("?".into())),
            UNKNOWN_REASON
        );
    }

    #[test]
    fn post_times_are_shown_exactly_like_ctime_in_the_readers_zone() {
        let utc = chrono::DateTime::from_timestamp_micros(1_763_794_800_000_000).expect("a time");
        let india = chrono::FixedOffset::east_opt(5 * 3600 + 1800).expect("an offset");
        assert_eq!(
            local_time(&utc.with_timezone(&india)),
            "Sat Nov 22 12:30:00 2025"
        );
        let utc_zone = chrono::FixedOffset::east_opt(0).expect("an offset");
        let shown = local_time(&utc.with_timezone(&utc_zone));
        assert_eq!(shown, "Sat Nov 22 07:00:00 2025");
        // The same as the server's own rendering of C's ctime.
        assert_eq!(shown, sns_core::Timestamp(1_763_794_800_000_000).ctime());
        let early = chrono::DateTime::from_timestamp_micros(1_765_090_074_000_000).expect("a time");
        assert_eq!(
            local_time(&early.with_timezone(&utc_zone)),
            "Sun Dec  7 06:47:54 2025"
        );
    }

    #[test]
    fn control_characters_in_posts_are_shown_escaped() {
        assert_eq!(
            terminal_safe("plain text\tand a tab"),
            "plain text\tand a tab"
        );
        assert_eq!(terminal_safe("\u{1b}[2Jgone"), "\\u{1b}[2Jgone");
        assert_eq!(terminal_safe("csi\u{9b}31m"), "csi\\u{9b}31m");
        assert_eq!(
            terminal_safe("\u{202e}txt.exe\u{2066}"),
            "\\u{202e}txt.exe\\u{2066}"
        );
        assert_eq!(terminal_safe("a\\u{1b}b"), "a\\\\u{1b}b");
        assert_eq!(terminal_safe("bell\u{7}"), "bell\\u{7}");
    }

    #[test]
    fn user_lists_end_each_id_with_a_comma() {
        let users: Vec<UserId> = [1, 2, 3].into_iter().filter_map(UserId::new).collect();
        assert_eq!(user_list(&users), "1, 2, 3, ");
        assert_eq!(user_list(&[]), "");
    }
}
