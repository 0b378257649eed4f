//! One keep-alive HTTP/1.1 connection to a backend, driven by the request that holds it: the
//! request's own task writes the request and reads the response, with no connection task and
//! no channel between the two (hyper's client connection costs both, about a tenth of the
//! proxy's CPU per request). The wire format is `backend_wire`'s.

use std::future::poll_fn;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{HeaderMap, Method, Response};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::backend_wire::{
    parse_response_head, put_chunk, put_chunk_size, put_chunked_end, ChunkedDecoder, ChunkedError,
    Decoded, HeadError, ParsedHead, RequestFraming, ResponseFraming,
};
use super::limits::BoxError;

/// Room made in the read buffer before each read.
const READ_RESERVE: usize = 16 * 1024;
/// Body frames up to this size are copied behind what is waiting to be written, so the head
/// and a small body leave in one write; larger ones are written as they are.
const COALESCE_BYTES: usize = 16 * 1024;

/// A connection to a backend and the bytes read from it that no response has consumed yet.
pub struct BackendConnection {
    stream: TcpStream,
    read: BytesMut,
    /// Counts the connection among the backend's `max_connections` until it closes.
    _permit: OwnedSemaphorePermit,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    #[error("the backend closed the connection before it answered")]
    ClosedBeforeAnswer,
    #[error("the backend closed the connection in the middle of its response head")]
    ClosedInHead,
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("the client's request body failed: {0}")]
    ClientBody(#[source] BoxError),
    #[error("the request body differs from its Content-Length {expected}: {sent} bytes")]
    LengthMismatch { expected: u64, sent: u64 },
}

impl ExchangeError {
    /// The backend took the request, if at all, without a byte of answer: on a reused
    /// connection it had most likely closed before the request arrived.
    pub fn unanswered(&self) -> bool {
        match self {
            ExchangeError::ClosedBeforeAnswer | ExchangeError::Write(_) => true,
            ExchangeError::Read(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// The head of the backend's answer, and how its body follows.
#[derive(Debug)]
pub struct Answer {
    pub response: Response<()>,
    pub body: BodyReader,
    /// The connection may carry another request after this body: the backend keeps it alive
    /// and took the whole request body.
    pub reusable: bool,
}

impl BackendConnection {
    pub fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> BackendConnection {
        BackendConnection {
            stream,
            read: BytesMut::new(),
            _permit: permit,
        }
    }

    /// Whether an idle connection can take a request: the backend has neither closed it nor
    /// sent anything unasked. Costs no system call while the socket has shown no event.
    pub fn idle_usable(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Nothing left over from the last response: the connection can go back to its pool.
    pub fn clean(&self) -> bool {
        self.read.is_empty()
    }

    /// Sends a request without a body (`head` already encoded) and reads the answer's head.
    pub async fn exchange_bodiless(
        &mut self,
        head: &[u8],
        method: &Method,
    ) -> Result<Answer, ExchangeError> {
        let (mut reader, mut writer) = self.stream.split();
        writer.write_all(head).await.map_err(ExchangeError::Write)?;
        let (response, framing, keep_alive) =
            read_head(&mut reader, &mut self.read, method).await?;
        Ok(Answer {
            response,
            body: BodyReader::new(framing),
            reusable: keep_alive,
        })
    }

    /// Sends a request and its body, framed as `framing`, and reads the answer's head. An
    /// answer that comes before the whole body was sent (an early 413, say) ends the sending;
    /// the connection then closes after that answer.
    pub async fn exchange<B>(
        &mut self,
        head: &[u8],
        method: &Method,
        framing: RequestFraming,
        body: B,
    ) -> Result<Answer, ExchangeError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (mut reader, mut writer) = self.stream.split();
        let send = send_body(&mut writer, head, framing, body);
        let receive = read_head(&mut reader, &mut self.read, method);
        let mut send = pin!(send);
        let mut receive = pin!(receive);
        let (head, body_sent) = tokio::select! {
            biased;
            sent = &mut send => {
                sent?;
                (receive.await?, true)
            }
            head = &mut receive => (head?, false),
        };
        let (response, framing, keep_alive) = head;
        Ok(Answer {
            response,
            body: BodyReader::new(framing),
            reusable: keep_alive && body_sent,
        })
    }

    /// The next frame of the response body that `body` reads.
    pub fn poll_body_frame(
        &mut self,
        body: &mut BodyReader,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match body.decode(&mut self.read) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::Trailers(trailers)) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            make_room(&mut self.read);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready(body.at_close().err().map(Err)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(BodyError::Read(e)))),
            }
        }
    }
}

/// Reads up to the final response head: interim responses (100 Continue) are skipped.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    method: &Method,
) -> Result<(Response<()>, ResponseFraming, bool), ExchangeError> {
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            answered = true;
            match parse_response_head(buf, method)? {
                Some((length, ParsedHead::Interim)) => {
                    buf.advance(length);
                    continue;
                }
                Some((
                    length,
                    ParsedHead::Final {
                        response,
                        framing,
                        keep_alive,
                    },
                )) => {
                    buf.advance(length);
                    return Ok((response, framing, keep_alive));
                }
                None => {}
            }
        }
        make_room(buf);
        match reader.read_buf(buf).await.map_err(ExchangeError::Read)? {
            0 if answered => return Err(ExchangeError::ClosedInHead),
            0 => return Err(ExchangeError::ClosedBeforeAnswer),
            _ => {}
        }
    }
}

/// Writes `head` and the body framed as `framing`. Frames that are ready at once join what is
/// waiting to be written; the writes wait only for the client's next frame.
async fn send_body<W, B>(
    writer: &mut W,
    head: &[u8],
    framing: RequestFraming,
    body: B,
) -> Result<(), ExchangeError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut out = BytesMut::with_capacity(head.len() + COALESCE_BYTES);
    out.put_slice(head);
    let mut sent = 0u64;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let polled = if out.is_empty() {
            poll_fn(|cx| body.as_mut().poll_frame(cx)).await
        } else {
            let ready_now = body
                .as_mut()
                .poll_frame(&mut Context::from_waker(Waker::noop()));
            match ready_now {
                Poll::Ready(polled) => polled,
                Poll::Pending => {
                    write_out(writer, &mut out).await?;
                    continue;
                }
            }
        };
        let frame = match polled {
            None => break,
            Some(Err(e)) => return Err(ExchangeError::ClientBody(e.into())),
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        sent += data.len() as u64;
        if let RequestFraming::Length(expected) = framing {
            if sent > expected {
                return Err(ExchangeError::LengthMismatch { expected, sent });
            }
        }
        if data.len() <= COALESCE_BYTES {
            match framing {
                RequestFraming::Chunked => put_chunk(&mut out, &data),
                _ => out.put_slice(&data),
            }
        } else {
            if framing == RequestFraming::Chunked {
                put_chunk_size(&mut out, data.len());
            }
            write_out(writer, &mut out).await?;
            writer
                .write_all(&data)
                .await
                .map_err(ExchangeError::Write)?;
            if framing == RequestFraming::Chunked {
                out.put_slice(b"\r\n");
            }
        }
        if out.len() >= COALESCE_BYTES {
            write_out(writer, &mut out).await?;
        }
    }
    match framing {
        RequestFraming::Length(expected) if sent != expected => {
            return Err(ExchangeError::LengthMismatch { expected, sent })
        }
        RequestFraming::Chunked => put_chunked_end(&mut out, trailers.as_ref()),
        _ => {}
    }
    write_out(writer, &mut out).await
}

/// Writes what is waiting in `out`, which is then empty.
async fn write_out<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut BytesMut,
) -> Result<(), ExchangeError> {
    writer.write_all(out).await.map_err(ExchangeError::Write)?;
    out.clear();
    Ok(())
}

/// Room for the next read in `buf`, made before it runs low.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_RESERVE / 4 {
        buf.reserve(READ_RESERVE);
    }
}

/// Why reading a response body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the response body: {0}")]
    Read(#[source] io::Error),
    #[error("the backend closed the connection {left} bytes before the end of its response body")]
    ClosedEarly { left: u64 },
    #[error("the backend closed the connection inside its chunked response body")]
    ClosedInChunks,
    #[error(transparent)]
    Chunked(#[from] ChunkedError),
}

/// Where the response body stands.
#[derive(Debug)]
pub struct BodyReader {
    state: BodyState,
}

#[derive(Debug)]
enum BodyState {
    /// This many bytes left.
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Ended,
}

impl BodyReader {
    fn new(framing: ResponseFraming) -> BodyReader {
        let state = match framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => BodyState::Ended,
            ResponseFraming::Length(n) => BodyState::Length(n),
            ResponseFraming::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            ResponseFraming::UntilClose => BodyState::UntilClose,
        };
        BodyReader { state }
    }

    pub fn ended(&self) -> bool {
        matches!(self.state, BodyState::Ended)
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Ended => SizeHint::with_exact(0),
            BodyState::Chunked(_) | BodyState::UntilClose => SizeHint::default(),
        }
    }

    /// The next piece of the body from the bytes read so far.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        match &mut self.state {
            BodyState::Ended => Ok(Decoded::End),
            _ if buf.is_empty() => Ok(Decoded::NeedMore),
            BodyState::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                if *left == 0 {
                    self.state = BodyState::Ended;
                }
                Ok(Decoded::Data(buf.split_to(take).freeze()))
            }
            BodyState::Chunked(decoder) => {
                let decoded = decoder.decode(buf)?;
                if decoder.is_done() && decoded == Decoded::End {
                    self.state = BodyState::Ended;
                }
                Ok(decoded)
            }
            BodyState::UntilClose => Ok(Decoded::Data(buf.split().freeze())),
        }
    }

    /// The connection closed: the end of a body that runs until the close, else an error.
    fn at_close(&mut self) -> Result<(), BodyError> {
        let outcome = match self.state {
            BodyState::UntilClose | BodyState::Ended => Ok(()),
            BodyState::Length(left) => Err(BodyError::ClosedEarly { left }),
            BodyState::Chunked(_) => Err(BodyError::ClosedInChunks),
        };
        self.state = BodyState::Ended;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::{BodyExt as _, Full};

    use super::*;
    use crate::proxy::backend_wire::encode_request_head;

    /// A connected pair: the backend's end and a connection to it.
    async fn pair() -> (TcpStream, BackendConnection) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (backend, _) = listener.accept().await.unwrap();
        (backend, BackendConnection::new(client, permit))
    }

    async fn read_body(conn: &mut BackendConnection, mut reader: BodyReader) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(frame) = poll_fn(|cx| conn.poll_body_frame(&mut reader, cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                body.extend_from_slice(&data);
            }
        }
        body
    }

    /// Reads from `backend` until `needle` has arrived; returns what came.
    async fn read_until(backend: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut byte = [0u8; 4096];
        while !got.windows(needle.len()).any(|w| w == needle) {
            let n = backend.read(&mut byte).await.unwrap();
            assert!(n > 0, "closed before {needle:?}; got {got:?}");
            got.extend_from_slice(&byte[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_chunked_upload_and_a_chunked_answer_cross_intact() {
        let (mut backend, mut conn) = pair().await;
        let body = Pieces(["abc", "", "defgh"].map(Bytes::from).into());
        let head = encode_request_head(&Method::POST, "/u", &HeaderMap::new());
        let exchange = conn.exchange(&head, &Method::POST, RequestFraming::Chunked, body);
        let backend_side = async {
            let got = read_until(&mut backend, b"0\r\n\r\n").await;
            backend
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n4\r\nok!!\r\n0\r\n\r\n")
                .await
                .unwrap();
            got
        };
        let (answer, got) = tokio::join!(exchange, backend_side);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "POST /u HTTP/1.1\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"
        );
        let answer = answer.unwrap();
        assert_eq!(answer.response.status(), 201);
        assert!(answer.reusable);
        assert_eq!(read_body(&mut conn, answer.body).await, b"ok!!");
        assert!(conn.clean() && conn.idle_usable());
    }

    /// A body of data frames, each ready at once.
    struct Pieces(VecDeque<Bytes>);

    impl Body for Pieces {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|piece| Ok(Frame::data(piece))))
        }
    }

    /// A body whose first frame never comes.
    struct NeverEnds;

    impl Body for NeverEnds {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn an_early_answer_ends_the_upload_and_the_connection() {
        let (mut backend, mut conn) = pair().await;
        // The backend answers after the head alone.
        let body = NeverEnds;
        let head = encode_request_head(&Method::PUT, "/big", &HeaderMap::new());
        let exchange = conn.exchange(&head, &Method::PUT, RequestFraming::Chunked, body);
        let backend_side = async {
            read_until(&mut backend, b"\r\n\r\n").await;
            backend
                .write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig")
                .await
                .unwrap();
        };
        let (answer, ()) = tokio::join!(exchange, backend_side);
        let answer = answer.unwrap();
        assert_eq!(answer.response.status(), 413);
        assert!(!answer.reusable, "the request body was cut short");
        assert_eq!(read_body(&mut conn, answer.body).await, b"big");
    }

    #[tokio::test]
    async fn a_short_body_is_refused_and_a_truncated_answer_is_an_error() {
        let (_backend, mut conn) = pair().await;
        let head = encode_request_head(&Method::POST, "/", &HeaderMap::new());
        let short = Full::new(Bytes::from_static(b"abc")).map_err(BoxError::from);
        let failed = conn
            .exchange(&head, &Method::POST, RequestFraming::Length(5), short)
            .await;
        assert!(matches!(
            failed,
            Err(ExchangeError::LengthMismatch {
                expected: 5,
                sent: 3
            })
        ));

        let (mut backend, mut conn) = pair().await;
        let head = encode_request_head(&Method::GET, "/", &HeaderMap::new());
        let exchange = conn.exchange_bodiless(&head, &Method::GET);
        let backend_side = async {
            read_until(&mut backend, b"\r\n\r\n").await;
            backend
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                .await
                .unwrap();
            drop(backend);
        };
        let (answer, ()) = tokio::join!(exchange, backend_side);
        let mut reader = answer.unwrap().body;
        let mut frames = Vec::new();
        while let Some(frame) = poll_fn(|cx| conn.poll_body_frame(&mut reader, cx)).await {
            frames.push(frame.map(|f| f.into_data().ok()));
        }
        assert_eq!(frames.len(), 2);
        assert!(matches!(frames[1], Err(BodyError::ClosedEarly { left: 7 })));
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_usable_and_its_request_unanswered() {
        let (backend, mut conn) = pair().await;
        assert!(conn.idle_usable());
        drop(backend);
        let head = encode_request_head(&Method::GET, "/", &HeaderMap::new());
        let failed = conn.exchange_bodiless(&head, &Method::GET).await;
        assert!(
            failed.as_ref().is_err_and(ExchangeError::unanswered),
            "{failed:?}"
        );
        assert!(!conn.idle_usable());
    }

    #[tokio::test]
    async fn a_body_until_close_ends_at_the_close() {
        let (mut backend, mut conn) = pair().await;
        let head = encode_request_head(&Method::GET, "/", &HeaderMap::new());
        let exchange = conn.exchange_bodiless(&head, &Method::GET);
        let backend_side = async {
            read_until(&mut backend, b"\r\n\r\n").await;
            backend
                .write_all(b"HTTP/1.1 200 OK\r\n\r\nall of it")
                .await
                .unwrap();
            drop(backend);
        };
        let (answer, ()) = tokio::join!(exchange, backend_side);
        let answer = answer.unwrap();
        assert!(!answer.reusable);
        assert_eq!(read_body(&mut conn, answer.body).await, b"all of it");
    }
}
