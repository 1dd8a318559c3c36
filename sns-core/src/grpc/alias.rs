//! Serving one generated service under a second package name.
//!
//! The course used package `csce438` in one semester and `csce662` in another, with identical
//! messages. Rather than generate the code twice, [`Renamed`] answers `/<alias>/<Method>` by
//! rewriting the path to `/<target>/<Method>` and calling the one implementation.

use std::marker::PhantomData;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Uri, uri::PathAndQuery};
use tonic::server::NamedService;

/// A pair of fully qualified service names: the alias served and the generated target.
pub(crate) trait Alias: Send + Sync + 'static {
    const NAME: &'static str;
    const TARGET: &'static str;
}

/// `csce662.SNSService` served by the `csce438.SNSService` implementation.
pub(crate) struct Csce662Sns;

impl Alias for Csce662Sns {
    const NAME: &'static str = "csce662.SNSService";
    const TARGET: &'static str = "csce438.SNSService";
}

/// `csce662.CoordService` served by the `csce438.CoordService` implementation.
pub(crate) struct Csce662Coord;

impl Alias for Csce662Coord {
    const NAME: &'static str = "csce662.CoordService";
    const TARGET: &'static str = "csce438.CoordService";
}

/// `inner` served under the alias `A::NAME`.
pub(crate) struct Renamed<S, A> {
    inner: S,
    alias: PhantomData<fn() -> A>,
}

impl<S, A> Renamed<S, A> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            alias: PhantomData,
        }
    }
}

impl<S: Clone, A> Clone for Renamed<S, A> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

impl<S, A: Alias> NamedService for Renamed<S, A> {
    const NAME: &'static str = A::NAME;
}

impl<S, A> Service<Request<Body>> for Renamed<S, A>
where
    S: Service<Request<Body>>,
    A: Alias,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if let Some(uri) = renamed_uri::<A>(request.uri()) {
            *request.uri_mut() = uri;
        }
        self.inner.call(request)
    }
}

fn renamed_uri<A: Alias>(uri: &Uri) -> Option<Uri> {
    let method = uri
        .path()
        .strip_prefix('/')?
        .strip_prefix(A::NAME)?
        .strip_prefix('/')?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(format!("/{}/{method}", A::TARGET)).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_paths_are_rewritten_to_the_target() {
        let uri: Uri = "http://h:1/csce662.SNSService/Login".parse().expect("uri");
        let renamed = renamed_uri::<Csce662Sns>(&uri).expect("renamed");
        assert_eq!(renamed.path(), "/csce438.SNSService/Login");
        let other: Uri = "http://h:1/csce438.SNSService/Login".parse().expect("uri");
        assert!(renamed_uri::<Csce662Sns>(&other).is_none());
    }
}
