//! The `--bus` flag of `synchronizer` and `sns up`: how synchronizers carry events between
//! clusters. `local` (read the other clusters' masters directly), `grpc` (synchronizers
//! subscribe to each other); an `amqp://` or `amqps://` URL names a RabbitMQ broker.

use sns_core::{AmqpOptions, Bus};

/// What `--bus` accepts, for error messages.
pub const CHOICES: &str = "local, grpc or amqp://USER:PASSWORD@HOST:PORT/VHOST";

/// Parses a `--bus` value (case-insensitive names; a URL's scheme is case-insensitive). The
/// error never repeats a URL's password.
pub fn parse_bus(value: &str) -> Result<Bus, String> {
    let lower = value.trim().to_ascii_lowercase();
    match lower.as_str() {
        "local" => Ok(Bus::Local),
        "grpc" => Ok(Bus::Grpc),
        url if url.starts_with("amqp://") || url.starts_with("amqps://") => {
            let options = AmqpOptions::new(value.trim());
            options.validate().map_err(|e| e.to_string())?;
            Ok(Bus::Amqp(options))
        }
        _ => Err(format!(
            "unknown bus {:?}: use {CHOICES}",
            without_userinfo(value)
        )),
    }
}

/// `value` with the `user:password@` part of a URL left out.
fn without_userinfo(value: &str) -> String {
    match (value.split_once("://"), value.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &value[at + 1..]),
        (None, Some(at)) => value[at + 1..].to_string(),
        _ => value.to_string(),
    }
}

/// The short name of a bus, as tables and logs show it.
pub fn bus_name(bus: &Bus) -> &'static str {
    match bus {
        Bus::None => "none",
        Bus::Local => "local",
        Bus::Grpc => "grpc",
        Bus::Amqp(_) => "amqp",
        // `Bus` is non-exhaustive: a bus of a feature this build does not know of.
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively() {
        assert!(matches!(parse_bus("local"), Ok(Bus::Local)));
        assert!(matches!(parse_bus("GRPC"), Ok(Bus::Grpc)));
        assert!(matches!(parse_bus(" grpc "), Ok(Bus::Grpc)));
    }

    #[test]
    fn a_broker_url_names_the_rabbitmq_bus() {
        let bus = parse_bus("amqp://guest:guest@127.0.0.1:5672/%2f").expect("a broker");
        assert!(matches!(&bus, Bus::Amqp(o) if o.url == "amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert_eq!(bus_name(&bus), "amqp");
        let error = parse_bus("AMQPS://user:secret@broker.example:5671/").expect_err("no TLS");
        assert!(error.contains("only amqp://"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn anything_else_names_the_choices() {
        for value in ["", "rabbit", "http://127.0.0.1:5672", "none"] {
            let error = parse_bus(value).expect_err("not a bus");
            assert!(error.contains(CHOICES), "{error}");
        }
    }

    #[test]
    fn errors_leave_out_passwords() {
        let error = parse_bus("rabbit://guest:secret@127.0.0.1:5672/").expect_err("not a bus");
        assert!(!error.contains("secret"), "{error}");
        assert!(error.contains("rabbit://127.0.0.1:5672/"), "{error}");
    }

    #[test]
    fn names_round_trip() {
        for bus in [Bus::Local, Bus::Grpc] {
            let parsed = parse_bus(bus_name(&bus)).expect("a bus");
            assert_eq!(bus_name(&parsed), bus_name(&bus));
        }
    }
}
