//! gRPC adapters: each converts wire messages to domain types, calls the core, and converts
//! back. Errors cross the wire in exactly one place, [`status`] (both ways).

pub mod admin;
pub(crate) mod alias;
pub mod client;
pub(crate) mod coord;
pub(crate) mod events;
pub(crate) mod log;
pub(crate) mod replication;
pub(crate) mod sns;

pub(crate) mod metadata;
mod peers;
pub(crate) mod raw;
mod serve;
mod status;

pub use serve::SHUTDOWN_GRACE;
pub(crate) use serve::until_stopped;

pub(crate) use status::{Asked, error, status};

/// Runs `futures` at once (on this task) and gives their outputs in the order given: a call to
/// every member of a coordinator group.
pub(crate) async fn join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
