//! `sns status`: the coordinator's view of the deployment as a table, asked of its
//! `sns.v1.Admin` service through [`sns_core::admin::AdminClient`].
//!
//! The cluster token is the one given, else the one in `--cluster-token-file`, else the one in
//! `DIR/cluster-token` of the deployment's `--data-dir`; without one, a protected coordinator's
//! refusal says where to find it.

use std::path::PathBuf;

use sns_core::Error;
use sns_core::admin::AdminClient;

use crate::TokenArgs;
use crate::tables;
use crate::token::{DEFAULT_ROOT, TOKEN_FILE};

/// `sns status`'s flags.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Coordinator host.
    #[arg(short = 'h', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Coordinator port.
    #[arg(short = 'k', long = "port", default_value_t = 9090)]
    port: u16,
    /// Every coordinator of a group, HOST:PORT,HOST:PORT,...: asks the first that answers
    /// (instead of -h/-k).
    #[arg(long, value_name = "HOST:PORT,...")]
    coordinators: Option<String>,
    /// The deployment's data directory, where the cluster token is read from
    /// (DIR/cluster-token) when none is given.
    #[arg(long, default_value = DEFAULT_ROOT)]
    data_dir: PathBuf,
    #[command(flatten)]
    token: TokenArgs,
}

/// Asks the coordinator for its view and prints it as a table.
pub async fn run(args: StatusArgs) -> Result<(), String> {
    let token = args.token.resolve(&args.data_dir)?;
    let sent_token = token.is_some();
    let addr = crate::coordinator_addr(args.coordinators.as_deref(), &args.host, args.port)?;
    let mut unreachable = None;
    let mut status = None;
    for member in addr.split(',') {
        match AdminClient::connect(&sns_core::Network::tcp(), member, token.clone()).await {
            Ok(admin) => {
                status = Some(admin.status().await.map_err(|e| refusal(&e, sent_token))?);
                break;
            }
            Err(e) => unreachable = Some(e),
        }
    }
    let status = status.ok_or_else(|| {
        let why = unreachable.map_or_else(String::new, |e| e.to_string());
        format!("cannot reach the coordinator: {why}")
    })?;
    print!("{}", tables::status(&status));
    Ok(())
}

/// What `sns status` says when the coordinator does not answer with its view.
fn refusal(error: &Error, sent_token: bool) -> String {
    match (error, sent_token) {
        (Error::Unauthorized, false) => format!(
            "status failed: the coordinator wants the cluster token, and none was found: \
             give --data-dir (the deployment's, holding {TOKEN_FILE}), \
             --cluster-token-file or --cluster-token"
        ),
        (Error::Unauthorized, true) => {
            "status failed: the coordinator refused this cluster token".to_string()
        }
        (error, _) => format!("status failed: {error}"),
    }
}
