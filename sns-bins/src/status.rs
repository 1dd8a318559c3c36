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
    let addr = sns_core::transport::address(&args.host, args.port);
    let admin = AdminClient::connect(&sns_core::Network::tcp(), &addr, token)
        .await
        .map_err(|e| format!("cannot reach the coordinator: {e}"))?;
    let status = admin.status().await.map_err(|e| refusal(&e, sent_token))?;
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
