//! HTTP/1.1 Upgrade (WebSocket): the request goes over a connection of its own to the backend,
//! and after its 101 the client's and the backend's connections are spliced together.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;

use super::client_body::WatchedBody;
use super::limits::BoxError;

/// The client's side of an upgrade the request asks for (`Connection: upgrade` and an `Upgrade`
/// header over HTTP/1.1), else `None`.
pub fn client_upgrade(req: &mut Request<Incoming>) -> Option<OnUpgrade> {
    let asked = req.version() == hyper::Version::HTTP_11
        && req.headers().get(header::UPGRADE).is_some()
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            });
    asked.then(|| hyper::upgrade::on(req))
}

/// Sends `upstream` on a new connection to `backend`; when the backend switches protocols, a
/// task splices both upgraded connections until either side closes, holding `permit`, the
/// request's place among the backend's connections, for as long.
pub async fn forward(
    upstream: Request<WatchedBody>,
    backend: SocketAddr,
    client_upgrade: OnUpgrade,
    permit: OwnedSemaphorePermit,
) -> Result<Response<Incoming>, BoxError> {
    let stream = tokio::net::TcpStream::connect(backend).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut response = sender.send_request(upstream).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((client, backend)) => {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(backend),
                    )
                    .await;
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        });
    }
    Ok(response)
}
