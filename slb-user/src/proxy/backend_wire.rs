//! HTTP/1.1 as slb speaks it to a backend, without I/O: the request head with its body's framing,
//! the response head with its body's framing (RFC 9112 §6.3), and the chunked coding both ways.
//! `backend_connection` does the reading and writing.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::body::SizeHint;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};

/// Most header fields a backend's response head may have (hyper's own default).
const MAX_RESPONSE_HEADERS: usize = 100;
/// Longest response head (hyper's default read buffer): a longer one is the backend's fault.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 400 * 1024;
/// Longest chunk-size line (with extensions) or trailer section before the body counts as
/// malformed.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// How the request body goes to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: the length is not known up front (an HTTP/2 client's
    /// stream without `content-length`, a chunked HTTP/1.1 upload).
    Chunked,
}

impl RequestFraming {
    /// Sets the framing headers of `headers` for a body that `ended` already or whose size is
    /// `hint`; the client's `Transfer-Encoding` was dropped as hop-by-hop before.
    pub fn settle(method: &Method, headers: &mut HeaderMap, ended: bool, hint: &SizeHint) -> Self {
        if ended {
            // A method whose request has content semantics says so even when it is empty, as
            // a client would (RFC 9110 §8.6); the others send no framing at all.
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH)
                || headers.contains_key(header::CONTENT_LENGTH)
            {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            return RequestFraming::Empty;
        }
        match hint.exact() {
            Some(length) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                if length == 0 {
                    RequestFraming::Empty
                } else {
                    RequestFraming::Length(length)
                }
            }
            None => {
                headers.remove(header::CONTENT_LENGTH);
                headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
                RequestFraming::Chunked
            }
        }
    }
}

/// `METHOD target HTTP/1.1`, the fields and the blank line, as the backend gets them.
pub fn encode_request_head(method: &Method, target: &str, headers: &HeaderMap) -> BytesMut {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let mut head = BytesMut::with_capacity(method.as_str().len() + target.len() + fields + 16);
    head.put_slice(method.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(target.as_bytes());
    head.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    head.put_slice(b"\r\n");
    head
}

/// Appends one chunk of the chunked coding to `out`.
pub fn put_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        // An empty chunk would end the body.
        return;
    }
    put_chunk_size(out, data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The chunk-size line of a chunk of `len` bytes.
pub fn put_chunk_size(out: &mut BytesMut, len: usize) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

/// The last chunk, the trailer fields if any, and the blank line that end a chunked body.
pub fn put_chunked_end(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: a HEAD request's response, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection (neither length nor chunked given).
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub enum ParsedHead {
    /// 100 Continue, 102, 103: an interim response, skipped.
    Interim,
    Final {
        response: Response<()>,
        framing: ResponseFraming,
        /// The connection may carry another request once the body has ended.
        keep_alive: bool,
    },
}

/// What is wrong with a backend's response head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the backend's response head is malformed: {0}")]
    Malformed(String),
    #[error("the backend's response head has more than {MAX_RESPONSE_HEADERS} fields")]
    TooManyFields,
    #[error("the backend's response head is longer than {MAX_RESPONSE_HEAD_BYTES} bytes")]
    TooLong,
    #[error("the backend switched protocols, which the request did not ask for")]
    UnaskedSwitch,
    #[error("the backend's Content-Length {0:?} is invalid")]
    InvalidLength(String),
}

/// Parses the response head at the start of `buf`: `None` when more bytes are needed, else the
/// head and its length in bytes. `method` is the request's (a HEAD response has no body).
pub fn parse_response_head(
    buf: &[u8],
    method: &Method,
) -> Result<Option<(usize, ParsedHead)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    let length = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD_BYTES => {
            return Err(HeadError::TooLong)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyFields),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let code = parsed.code.unwrap_or_default();
    let status =
        StatusCode::from_u16(code).map_err(|_| HeadError::Malformed(format!("status {code}")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(HeadError::UnaskedSwitch);
    }
    if status.is_informational() {
        return Ok(Some((length, ParsedHead::Interim)));
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // A reason other than the status's own goes on to the client, as the backend wrote it.
    let reason = parsed
        .reason
        .filter(|reason| status.canonical_reason() != Some(*reason))
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed(format!("field name {:?}", field.name)))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| HeadError::Malformed(format!("value of {name}")))?;
        headers.append(name, value);
    }
    let framing = response_framing(method, status, &headers)?;
    if framing == ResponseFraming::Chunked {
        // The coding overrides a length, which must not go on beside it (RFC 9112 §6.3):
        // a client would read either.
        headers.remove(header::CONTENT_LENGTH);
    }
    let keep_alive = version == Version::HTTP_11
        && framing != ResponseFraming::UntilClose
        && !has_token(&headers, header::CONNECTION, "close");
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = reason {
        response.extensions_mut().insert(reason);
    }
    Ok(Some((
        length,
        ParsedHead::Final {
            response,
            framing,
            keep_alive,
        },
    )))
}

/// RFC 9112 §6.3, in its order.
fn response_framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<ResponseFraming, HeadError> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(ResponseFraming::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked must be the last coding; any other last coding runs until the close.
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|coding| !coding.is_empty());
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => ResponseFraming::Chunked,
            _ => ResponseFraming::UntilClose,
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value.to_str().unwrap_or("");
        // A list of equal values is one length (RFC 9110 §8.6); anything else is invalid.
        for item in text.split(',').map(str::trim) {
            let parsed = (!item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()))
                .then(|| item.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| HeadError::InvalidLength(text.to_owned()))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(HeadError::InvalidLength(text.to_owned()));
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(0) => ResponseFraming::Empty,
        Some(n) => ResponseFraming::Length(n),
        None => ResponseFraming::UntilClose,
    })
}

/// Whether `name`'s comma-separated values include `token`.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// What the decoder found in the bytes it was given.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body has ended; the bytes after it belong to the next response.
    End,
    /// More bytes are needed.
    NeedMore,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the backend's chunked body is malformed: {0}")]
pub struct ChunkedError(&'static str);

/// The chunked coding of a response body, decoded as bytes arrive.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// At a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this much of it left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to a blank line.
    Trailers,
    Done,
}

impl ChunkedDecoder {
    /// The next piece of the body from the front of `buf` (consumed from it).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line_end) = find_crlf(buf) else {
                        return if buf.len() > MAX_CHUNK_LINE_BYTES {
                            Err(ChunkedError("chunk-size line too long"))
                        } else {
                            Ok(Decoded::NeedMore)
                        };
                    };
                    let size = parse_chunk_size(&buf[..line_end])?;
                    buf.advance(line_end + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkedError("no CRLF after a chunk's data"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        continue;
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((length, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(field.name.as_bytes()),
                                    HeaderValue::from_bytes(field.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            buf.advance(length);
                            self.state = ChunkState::Done;
                            return Ok(Decoded::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILER_BYTES => {
                            return Err(ChunkedError("trailer section too long"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(ChunkedError("malformed trailer field")),
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The hexadecimal size of a chunk-size line, its extensions ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ChunkedError> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 15 {
        return Err(ChunkedError("invalid chunk size"));
    }
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(ChunkedError("invalid chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| ChunkedError("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| ChunkedError("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: Method) -> (usize, ParsedHead) {
        parse_response_head(text.as_bytes(), &method)
            .expect("valid head")
            .expect("complete head")
    }

    fn final_head(text: &str, method: Method) -> (Response<()>, ResponseFraming, bool) {
        match head(text, method).1 {
            ParsedHead::Final {
                response,
                framing,
                keep_alive,
            } => (response, framing, keep_alive),
            ParsedHead::Interim => panic!("interim response"),
        }
    }

    #[test]
    fn request_framing_follows_the_body() {
        let mut headers = HeaderMap::new();
        let framing = RequestFraming::settle(&Method::GET, &mut headers, true, &SizeHint::new());
        assert_eq!(framing, RequestFraming::Empty);
        assert!(headers.is_empty(), "a bodiless GET carries no framing");

        let framing = RequestFraming::settle(&Method::POST, &mut headers, true, &SizeHint::new());
        assert_eq!(framing, RequestFraming::Empty);
        assert_eq!(headers[header::CONTENT_LENGTH], "0");

        let mut headers = HeaderMap::new();
        let framing = RequestFraming::settle(
            &Method::POST,
            &mut headers,
            false,
            &SizeHint::with_exact(12),
        );
        assert_eq!(framing, RequestFraming::Length(12));
        assert_eq!(headers[header::CONTENT_LENGTH], "12");

        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        let framing = RequestFraming::settle(&Method::PUT, &mut headers, false, &SizeHint::new());
        assert_eq!(framing, RequestFraming::Chunked);
        assert_eq!(headers[header::TRANSFER_ENCODING], "chunked");
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn the_request_head_is_origin_form_http_1_1() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let head = encode_request_head(&Method::GET, "/p?q=1", &headers);
        assert_eq!(
            &head[..],
            b"GET /p?q=1 HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
    }

    #[test]
    fn chunks_are_encoded_in_hex() {
        let mut out = BytesMut::new();
        put_chunk(&mut out, &[b'x'; 26]);
        put_chunk(&mut out, b"");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("9"));
        put_chunked_end(&mut out, Some(&trailers));
        assert_eq!(
            &out[..],
            [&b"1a\r\n"[..], &[b'x'; 26], b"\r\n0\r\nx-sum: 9\r\n\r\n"].concat()
        );
    }

    #[test]
    fn a_partial_head_asks_for_more() {
        let partial = b"HTTP/1.1 200 OK\r\ncontent-len";
        assert!(parse_response_head(partial, &Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let (response, framing, keep_alive) = final_head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-b: y\r\n\r\nhello",
            Method::GET,
        );
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-b"], "y");
        assert_eq!(framing, ResponseFraming::Length(5));
        assert!(keep_alive);

        let (_, framing, _) =
            final_head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD);
        assert_eq!(
            framing,
            ResponseFraming::Empty,
            "a HEAD response has no body"
        );
        let (_, framing, _) = final_head("HTTP/1.1 304 Not Modified\r\n\r\n", Method::GET);
        assert_eq!(framing, ResponseFraming::Empty);
        let (_, framing, _) = final_head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
            Method::GET,
        );
        assert_eq!(
            framing,
            ResponseFraming::Chunked,
            "chunked wins over a length"
        );
        let (response, _, _) = final_head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            Method::GET,
        );
        assert!(
            !response.headers().contains_key(header::CONTENT_LENGTH),
            "the length is dropped beside chunked"
        );
        let (_, framing, keep_alive) = final_head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            Method::GET,
        );
        assert_eq!(framing, ResponseFraming::UntilClose);
        assert!(!keep_alive);
        let (_, framing, keep_alive) = final_head("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!(framing, ResponseFraming::UntilClose);
        assert!(!keep_alive);
        let (_, framing, _) = final_head(
            "HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n",
            Method::GET,
        );
        assert_eq!(framing, ResponseFraming::Length(4));
    }

    #[test]
    fn a_reason_of_its_own_is_kept() {
        let (response, _, _) = final_head(
            "HTTP/1.1 200 Fine Indeed\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        );
        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine Indeed"[..]));
        let (response, _, _) =
            final_head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", Method::GET);
        assert!(response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .is_none());
    }

    #[test]
    fn connection_close_and_http_1_0_end_the_connection() {
        let (_, _, keep_alive) = final_head(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive, close\r\n\r\n",
            Method::GET,
        );
        assert!(!keep_alive);
        let (response, _, keep_alive) =
            final_head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", Method::GET);
        assert!(!keep_alive);
        assert_eq!(response.version(), Version::HTTP_10);
    }

    #[test]
    fn interim_responses_are_skipped_and_unasked_switches_refused() {
        let (length, parsed) = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", Method::POST);
        assert!(matches!(parsed, ParsedHead::Interim));
        assert_eq!(length, "HTTP/1.1 100 Continue\r\n\r\n".len());
        assert_eq!(
            parse_response_head(b"HTTP/1.1 101 Switching\r\n\r\n", &Method::GET).unwrap_err(),
            HeadError::UnaskedSwitch
        );
    }

    #[test]
    fn bad_heads_name_what_is_wrong() {
        for (text, expected) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 4, 5\r\n\r\n",
                HeadError::InvalidLength("4, 5".into()),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                HeadError::InvalidLength("-1".into()),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\n",
                HeadError::InvalidLength("+4".into()),
            ),
        ] {
            assert_eq!(
                parse_response_head(text.as_bytes(), &Method::GET).unwrap_err(),
                expected
            );
        }
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 2x0 OK\r\n\r\n", &Method::GET),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..=MAX_RESPONSE_HEADERS)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert_eq!(
            parse_response_head(
                format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes(),
                &Method::GET
            )
            .unwrap_err(),
            HeadError::TooManyFields
        );
        let long = format!(
            "HTTP/1.1 200 OK\r\nx: {}",
            "v".repeat(MAX_RESPONSE_HEAD_BYTES)
        );
        assert_eq!(
            parse_response_head(long.as_bytes(), &Method::GET).unwrap_err(),
            HeadError::TooLong
        );
    }

    /// Feeds `wire` to a decoder `step` bytes at a time, collecting the body and trailers.
    fn decode_in_steps(wire: &[u8], step: usize) -> (Vec<u8>, Option<HeaderMap>, BytesMut) {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let (mut body, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf).expect("valid chunked body") {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return (body, trailers, buf),
                Decoded::NeedMore => {
                    assert!(fed < wire.len(), "the decoder wants more than the body");
                    let next = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn a_chunked_body_decodes_however_it_arrives() {
        let wire =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 7\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, trailers, rest) = decode_in_steps(wire, step);
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(trailers.expect("trailers")["x-sum"], "7");
            // What was read beyond the body stays for whatever follows.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
        let (body, trailers, _) = decode_in_steps(b"3\r\nabc\r\n0\r\n\r\n", 4);
        assert_eq!(body, b"abc");
        assert!(trailers.is_none());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"z\r\n"[..],
            b"3\r\nabcX\r\n",
            b"-3\r\n",
            b"3 x\r\nabc\r\n",
            b"1000000000000000\r\n",
        ] {
            let mut decoder = ChunkedDecoder::default();
            let mut buf = BytesMut::from(wire);
            let outcome = loop {
                match decoder.decode(&mut buf) {
                    Ok(Decoded::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(outcome.is_err(), "{wire:?} gave {outcome:?}");
        }
        let mut decoder = ChunkedDecoder::default();
        let mut endless = BytesMut::from(&vec![b'1'; MAX_CHUNK_LINE_BYTES + 1][..]);
        assert!(decoder.decode(&mut endless).is_err());
    }
}
