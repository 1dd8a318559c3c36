//! The cluster token and protected mode: where a binary finds the token, how `sns up` makes and
//! keeps one, and which addresses a component may listen on without one.
//!
//! A token is taken from `--cluster-token` (or `SNS_CLUSTER_TOKEN`), else from the file
//! `--cluster-token-file` names, else from `<root>/cluster-token` when that file exists (`root`
//! is the deployment's data directory, `./sns-data` by default). `sns up` makes a random one
//! there on its first start (mode 0600, written to a temporary file, fsynced, then renamed),
//! as RabbitMQ keeps its Erlang cookie, so every other command on the machine finds it.
//! A component that has no token listens on loopback only unless told `--insecure`.

use std::io::{Read, Write};
use std::net::{IpAddr, ToSocketAddrs};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The token file's name inside a deployment's data directory.
pub const TOKEN_FILE: &str = "cluster-token";

/// The data directory every command looks in by default.
pub const DEFAULT_ROOT: &str = "./sns-data";

/// The longest token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 1024;

/// Bytes of randomness in a generated token (hex-encoded: 64 characters).
const GENERATED_BYTES: usize = 32;

/// Flags shared by the binaries that take part in a deployment's internal calls.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Shared secret for internal calls (heartbeats, registration, replication, sync, admin);
    /// when the coordinator has one, calls without it are refused [default: read from the
    /// token file].
    #[arg(
        long = "cluster-token",
        env = TOKEN_VARIABLE,
        hide_env_values = true
    )]
    pub cluster_token: Option<String>,
    /// File holding the cluster token, when none is given [default:
    /// ./sns-data/cluster-token, or DIR/cluster-token for a command whose --data-dir is the
    /// deployment's root].
    #[arg(long = "cluster-token-file", value_name = "FILE")]
    pub cluster_token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token given by flag or environment, checked. A token given on the command line,
    /// where every local user can read it (`ps`), or one shorter than [`MIN_TOKEN_CHARS`], is
    /// warned about.
    pub fn given(&self) -> Result<Option<String>, String> {
        let Some(token) = &self.cluster_token else {
            return Ok(None);
        };
        check(token).map_err(|why| format!("--cluster-token: {why}"))?;
        let from_environment = std::env::var(TOKEN_VARIABLE).is_ok_and(|v| v == *token);
        for warning in hygiene(token, from_environment) {
            tracing::warn!("{warning}");
        }
        Ok(Some(token.clone()))
    }

    /// The token this command uses: the one given, else the one in `--cluster-token-file`
    /// (which must exist), else the one in `<root>/cluster-token` if that file exists, else
    /// none. A file that cannot be read or holds no token is an error.
    pub fn resolve(&self, root: &Path) -> Result<Option<String>, String> {
        if let Some(token) = self.given()? {
            return Ok(Some(token));
        }
        if let Some(file) = &self.cluster_token_file {
            return read_token_file(file).map(Some);
        }
        let file = root.join(TOKEN_FILE);
        match std::fs::symlink_metadata(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => read_token_file(&file).map(Some),
        }
    }
}

/// The environment variable that may hold the token.
pub(crate) const TOKEN_VARIABLE: &str = "SNS_CLUSTER_TOKEN";

/// Tokens shorter than this are warned about: easy to guess.
pub const MIN_TOKEN_CHARS: usize = 16;

/// What is worth a warning about a token given `from_environment` or on the command line.
fn hygiene(token: &str, from_environment: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    if !from_environment {
        warnings.push(
            "the cluster token was given on the command line, where every local user can read \
             it (ps); keep it in a file of mode 0600 (--cluster-token-file, or cluster-token in \
             the data directory) or in SNS_CLUSTER_TOKEN instead"
                .to_string(),
        );
    }
    if token.chars().count() < MIN_TOKEN_CHARS {
        warnings.push(format!(
            "the cluster token is {} characters long; one of fewer than {MIN_TOKEN_CHARS} is \
             easy to guess (sns up makes 64 random hex characters)",
            token.chars().count()
        ));
    }
    warnings
}

/// Checks a token: one line of printable ASCII, at most 1024 bytes.
fn check(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("the cluster token is empty".to_string());
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "the cluster token is longer than {MAX_TOKEN_BYTES} bytes"
        ));
    }
    if !token.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("the cluster token must be printable ASCII on one line".to_string());
    }
    Ok(())
}

/// Reads the token kept in `path` (surrounding whitespace, such as a final newline, ignored).
/// Warns when the file is readable by others than its owner.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let cannot = |e: std::io::Error| format!("cannot read the cluster token file {shown}: {e}");
    let file = std::fs::File::open(path).map_err(cannot)?;
    let metadata = file.metadata().map_err(cannot)?;
    if !metadata.is_file() {
        return Err(format!(
            "the cluster token file {shown} is not a regular file"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_BYTES as u64 + 2)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    let token = std::str::from_utf8(&bytes)
        .ok()
        .map(str::trim)
        .filter(|token| check(token).is_ok())
        .ok_or_else(|| {
            format!(
                "the cluster token file {shown} does not hold a token (one line of printable \
                 ASCII, at most {MAX_TOKEN_BYTES} bytes); fix it, or remove it and let `sns up` \
                 make a new one"
            )
        })?;
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "the cluster token file {shown} may be read by other users than its owner; \
             `chmod 600 {shown}` keeps it secret"
        );
    }
    Ok(token.to_string())
}

/// A new random token: 32 bytes of the system's randomness (`/dev/urandom`), hex-encoded.
pub fn generate() -> Result<String, String> {
    let mut bytes = [0u8; GENERATED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|e| format!("cannot make a cluster token: /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token kept in `path`, or a new one written there if the file does not exist; says
/// whether it was made now.
pub fn keep_or_create(path: &Path) -> Result<(String, bool), String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        _ => return read_token_file(path).map(|token| (token, false)),
    }
    let token = generate()?;
    match write_token_file(path, &token) {
        Ok(()) => Ok((token, true)),
        // Another process made one first: everyone uses that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_token_file(path).map(|token| (token, false))
        }
        Err(e) => Err(format!(
            "cannot keep the cluster token in {}: {e}",
            path.display()
        )),
    }
}

/// Writes `token` to `path` crash-safely and only if `path` does not exist: into a temporary
/// file beside it (mode 0600), fsynced, linked as `path` (which fails with `AlreadyExists` if
/// another process made it first, so two first starts never end with two tokens), and the
/// directory fsynced, so `path` holds the whole token or nothing.
fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    sns_core::storage::create_private_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| TOKEN_FILE.to_string());
    // Unique to this writer: its process and a few random characters (not the token's).
    let random = generate().unwrap_or_default();
    let unique = random.get(..8).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.{unique}.tmp", std::process::id()));
    // A leftover of a crashed run with the same process id is replaced; `create_new` never
    // follows a link planted there.
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&temp);
    written
}

/// Whether `host` names only loopback addresses (`127.0.0.0/8`, `::1`, `localhost`). A name is
/// resolved; one that does not resolve is not loopback.
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    match (bare, 0).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// Protected mode: a component whose internal calls would be open (it has no token) may
/// listen on loopback only, unless `insecure` says the operator wants it anyway; that is
/// logged as an error on every start. `what` names the component in the messages.
pub fn check_bind(what: &str, bind: &str, has_token: bool, insecure: bool) -> Result<(), String> {
    if has_token || is_loopback(bind) {
        return Ok(());
    }
    if insecure {
        tracing::error!(
            "INSECURE: {what} listens on {bind} without a cluster token (--insecure): anyone who \
             can reach it may register, heartbeat, mirror and read its status"
        );
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {bind} without a cluster token: anyone who can reach it could \
         register, heartbeat, mirror or read its status. Give --cluster-token (or \
         SNS_CLUSTER_TOKEN, or a token file), bind 127.0.0.1, or pass --insecure"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_starts_racing_on_one_directory_end_with_one_token() {
        let root = tempfile::tempdir().expect("temp dir");
        let path = root.path().join("sns-data").join(TOKEN_FILE);
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || keep_or_create(&path).expect("a token"))
            })
            .collect();
        let results: Vec<(String, bool)> = racers
            .into_iter()
            .map(|r| r.join().expect("racer"))
            .collect();
        let kept = read_token_file(&path).expect("kept");
        assert!(
            results.iter().all(|(token, _)| *token == kept),
            "{results:?}"
        );
        assert_eq!(results.iter().filter(|(_, made)| *made).count(), 1);
        let leftovers = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }

    #[test]
    fn tokens_on_the_command_line_or_short_are_warned_about() {
        let long = "0123456789abcdef0123";
        assert!(hygiene(long, true).is_empty());
        let warnings = hygiene(long, false);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("command line"), "{warnings:?}");
        let warnings = hygiene("short", true);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("5 characters"), "{warnings:?}");
        assert_eq!(hygiene("short", false).len(), 2);
    }

    #[test]
    fn data_directories_are_made_for_their_owner_only_whatever_the_umask() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("sns-data/cluster1/server1");
        sns_core::storage::create_private_dir(&dir).expect("create");
        for made in [root.path().join("sns-data"), dir] {
            let mode = std::fs::metadata(&made).expect("made").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", made.display());
        }
    }

    #[test]
    fn loopback_hosts_are_told_from_the_others() {
        for host in ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "0.0.0.0",
            "::",
            "10.1.2.3",
            "192.168.0.1",
            "",
            "no-such-host.invalid",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn without_a_token_only_loopback_or_insecure_may_listen() {
        assert!(check_bind("tsd", "127.0.0.1", false, false).is_ok());
        assert!(check_bind("tsd", "0.0.0.0", true, false).is_ok());
        assert!(check_bind("tsd", "0.0.0.0", false, true).is_ok());
        let refused = check_bind("tsd", "0.0.0.0", false, false).expect_err("refused");
        assert!(refused.contains("--insecure"), "{refused}");
    }

    #[test]
    fn a_token_is_made_once_with_mode_0600_and_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("new/cluster-token");
        let (token, made) = keep_or_create(&path).expect("made");
        assert!(made);
        assert_eq!(token.len(), 2 * GENERATED_BYTES);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{token}\n")
        );
        assert_eq!(keep_or_create(&path).expect("kept"), (token.clone(), false));
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("new"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["cluster-token"]);
        assert_ne!(generate().expect("another"), token);
    }

    #[test]
    fn the_token_comes_from_the_flag_then_the_named_file_then_the_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let args = |token: Option<&str>, file: Option<&Path>| TokenArgs {
            cluster_token: token.map(str::to_string),
            cluster_token_file: file.map(Path::to_path_buf),
        };
        assert_eq!(args(None, None).resolve(dir.path()), Ok(None));
        std::fs::write(dir.path().join(TOKEN_FILE), "in-root\n").expect("write");
        let named = dir.path().join("named");
        std::fs::write(&named, "  named  \n").expect("write");
        assert_eq!(
            args(None, None).resolve(dir.path()),
            Ok(Some("in-root".to_string()))
        );
        assert_eq!(
            args(None, Some(&named)).resolve(dir.path()),
            Ok(Some("named".to_string()))
        );
        assert_eq!(
            args(Some("flag"), Some(&named)).resolve(dir.path()),
            Ok(Some("flag".to_string()))
        );
        let missing = args(None, Some(&dir.path().join("missing"))).resolve(dir.path());
        assert!(missing.is_err(), "{missing:?}");
        assert!(args(Some(""), None).resolve(dir.path()).is_err());
        assert!(args(Some("a\u{1b}b"), None).resolve(dir.path()).is_err());
    }

    #[test]
    fn a_garbage_or_unreadable_token_file_is_a_one_line_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(TOKEN_FILE);
        for garbage in [&b""[..], b"\n\n", b"\xff\xfe", b"two\nlines", &[b'x'; 5000]] {
            std::fs::write(&path, garbage).expect("write");
            let refused = read_token_file(&path).expect_err("garbage");
            assert!(refused.contains("does not hold a token"), "{refused}");
            assert!(!refused.contains('\n'), "{refused}");
            assert!(keep_or_create(&path).is_err(), "never replaced silently");
        }
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("a directory in its place");
        let refused = read_token_file(&path).expect_err("a directory");
        assert!(refused.contains(&path.display().to_string()), "{refused}");
    }
}
