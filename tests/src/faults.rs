//! A fault-injecting HTTP proxy in front of an [`crate::S3Server`]: it
//! forwards every request unchanged (the Host header and every signed header
//! included, so the server's SigV4 check still passes) and, when a test asks
//! for it, answers or breaks a request the way a flaky S3 does: 503 SlowDown,
//! 500 InternalError, a connection reset in the middle of a request or
//! response body, a body cut short of its Content-Length, a response that
//! never comes. The fault lives on the wire only; mysnap's code is the real one.
//!
//! ```no_run
//! # use mysnap_tests::{S3Server, faults::{FaultProxy, Fault, On, Times}};
//! # let server = S3Server::start(std::path::Path::new("/tmp/s3"));
//! let proxy = FaultProxy::start(&server.endpoint);
//! proxy.inject(Fault::SlowDown503, On::UploadPart, Times::First(3));
//! // point store.endpoint at proxy.endpoint ...
//! assert_eq!(proxy.injected(), 3);
//! ```

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::ServerThread;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What goes wrong with a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown` with S3's XML error body; the request is not forwarded.
    SlowDown503,
    /// `500 InternalError` with S3's XML error body; not forwarded.
    InternalError500,
    /// Half of the request body is read, then the connection is reset (RST);
    /// nothing is forwarded (an UploadPart cut off mid-way).
    ResetRequestBody,
    /// Forwarded; the response's headers and half its body are sent, then
    /// the connection is reset (RST) (a ranged GetObject cut off mid-way).
    ResetResponseBody,
    /// Forwarded; the response promises its Content-Length, sends half of
    /// it, then closes the connection normally (FIN).
    TruncateResponseBody,
    /// Forwarded; no response is ever sent (the connection stays open):
    /// only the client's read timeout ends it.
    StallResponse,
    /// Forwarded; the response's headers and half its body are sent, then
    /// nothing more while the connection stays open.
    StallResponseBody,
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum On {
    Any,
    Method(Method),
    /// `PUT ?partNumber&uploadId`
    UploadPart,
    /// `GET` of an object (not a listing), ranged or not.
    GetObject,
    /// `PUT` of a whole object.
    PutObject,
    /// A create-only write: `PUT` of a whole object or `POST ?uploadId`
    /// carrying `If-None-Match` (a store without conditional writes
    /// answers it 501 NotImplemented).
    ConditionalWrite,
    /// `POST ?uploads`
    CreateMultipartUpload,
    /// `POST ?uploadId`
    CompleteMultipartUpload,
    /// `DELETE ?uploadId`
    AbortMultipartUpload,
    /// `GET ?uploads` of a bucket
    ListMultipartUploads,
    /// `DELETE` of an object whose key ends with this text
    DeleteObject(String),
}

/// How many matching requests get the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    /// The next `n` matching requests (a transient fault).
    First(u32),
    /// Every matching request until [`FaultProxy::clear`] (a persistent fault).
    Always,
}

#[derive(Debug)]
struct Rule {
    fault: Fault,
    on: On,
    left: Option<u32>,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    injected: Vec<(Fault, String)>,
    forwarded: usize,
    seen: Vec<SeenRequest>,
    /// Requests answered by the proxy with this status and XML body.
    canned: Vec<(On, StatusCode, String)>,
}

/// A request as it arrived at the proxy: what it is and its headers (names
/// lowercase), for tests of what mysnap sends.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    kind: RequestKind,
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// Whether the request is of the kind `on` names.
    pub fn is(&self, on: &On) -> bool {
        self.kind.matches(on)
    }

    /// The value of header `name` (lowercase), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `METHOD /path?query`, for messages.
    pub fn describe(&self) -> String {
        self.kind.describe()
    }
}

impl State {
    /// The fault for this request, if a rule with attempts left matches it
    /// (the first such rule, whose count goes down).
    fn take(&mut self, what: &RequestKind) -> Option<Fault> {
        let rule = self
            .rules
            .iter_mut()
            .find(|r| r.left != Some(0) && what.matches(&r.on))?;
        if let Some(n) = &mut rule.left {
            *n -= 1;
        }
        let fault = rule.fault;
        self.injected.push((fault, what.describe()));
        Some(fault)
    }
}

/// What a request is, as far as faults care.
#[derive(Debug, Clone)]
struct RequestKind {
    method: Method,
    path: String,
    query: String,
    conditional: bool,
}

impl RequestKind {
    fn of<B>(req: &Request<B>) -> RequestKind {
        RequestKind {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            conditional: req.headers().contains_key("if-none-match"),
        }
    }

    fn has(&self, param: &str) -> bool {
        self.query
            .split('&')
            .any(|p| p == param || p.starts_with(&format!("{param}=")))
    }

    /// `/bucket/key...` (path style): an object, not a bucket.
    fn is_object(&self) -> bool {
        self.path
            .trim_start_matches('/')
            .split_once('/')
            .is_some_and(|(_, key)| !key.is_empty())
    }

    fn matches(&self, on: &On) -> bool {
        let m = &self.method;
        match on {
            On::Any => true,
            On::Method(want) => m == want,
            On::UploadPart => m == Method::PUT && self.has("partNumber") && self.has("uploadId"),
            On::GetObject => m == Method::GET && self.is_object() && !self.has("uploadId"),
            On::PutObject => m == Method::PUT && self.is_object() && !self.has("uploadId"),
            On::ConditionalWrite => {
                self.conditional
                    && (self.matches(&On::PutObject) || self.matches(&On::CompleteMultipartUpload))
            }
            On::CreateMultipartUpload => m == Method::POST && self.has("uploads"),
            On::CompleteMultipartUpload => m == Method::POST && self.has("uploadId"),
            On::AbortMultipartUpload => m == Method::DELETE && self.has("uploadId"),
            On::ListMultipartUploads => m == Method::GET && self.has("uploads"),
            On::DeleteObject(end) => {
                m == Method::DELETE
                    && self.is_object()
                    && !self.has("uploadId")
                    && self.path.ends_with(end.as_str())
            }
        }
    }

    fn describe(&self) -> String {
        format!("{} {}?{}", self.method, self.path, self.query)
    }
}

/// The proxy, on 127.0.0.1 in a [`ServerThread`]; stopped on drop (or by
/// [`FaultProxy::stop`]: then its port refuses connections, like an
/// endpoint that went away).
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: use it as `store.endpoint`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    server: ServerThread,
}

impl FaultProxy {
    /// A proxy forwarding to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("upstream {upstream:?} is not http://IP:PORT"));
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        // Stalled connections are dropped with the runtime.
        let server = ServerThread::start("fault-proxy", Duration::from_millis(200), move |l| {
            accept_loop(l, upstream, st)
        });
        FaultProxy {
            endpoint: server.endpoint.clone(),
            state,
            server,
        }
    }

    /// From now on, `fault` hits requests matching `on`, `times` times.
    /// Rules apply in the order they were added.
    pub fn inject(&self, fault: Fault, on: On, times: Times) {
        let left = match times {
            Times::First(n) => Some(n),
            Times::Always => None,
        };
        self.lock().rules.push(Rule { fault, on, left });
    }

    /// From now on, requests matching `on` are answered `200 OK` with the
    /// XML `body` instead of being forwarded (a store answering a call the
    /// test server lacks, such as ListMultipartUploads).
    pub fn answer(&self, on: On, body: &str) {
        self.answer_with(on, StatusCode::OK, body);
    }

    /// Like [`FaultProxy::answer`], with `status` (say, a 403 AccessDenied
    /// of a store that refuses the call).
    pub fn answer_with(&self, on: On, status: StatusCode, body: &str) {
        self.lock().canned.push((on, status, body.to_string()));
    }

    /// Removes every rule: requests are forwarded unchanged again.
    pub fn clear(&self) {
        let mut st = self.lock();
        st.rules.clear();
        st.canned.clear();
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> usize {
        self.lock().injected.len()
    }

    /// The faults injected so far and the requests they hit (for messages).
    pub fn log(&self) -> Vec<(Fault, String)> {
        self.lock().injected.clone()
    }

    /// Every request that arrived so far, in order, with its headers.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.lock().seen.clone()
    }

    /// How many requests reached the server.
    pub fn forwarded(&self) -> usize {
        self.lock().forwarded
    }

    /// Stops listening and drops every connection: the endpoint went away.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) {
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fault proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A second descriptor of the socket, to make its close a reset.
        let Ok(fd) = socket.as_fd().try_clone_to_owned() else {
            continue;
        };
        let conn = Arc::new(Conn {
            fd: Mutex::new(Some(fd)),
        });
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            handle(req, upstream, state.clone(), conn.clone())
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// One client connection, as far as a reset needs it.
struct Conn {
    fd: Mutex<Option<OwnedFd>>,
}

impl Conn {
    /// Makes the connection's close a reset (SO_LINGER 0); the caller then
    /// ends it with an error.
    fn reset_on_close(&self) {
        if let Some(fd) = self.fd.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
        }
    }
}

fn full(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .header("content-length", body.len())
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .expect("a valid response")
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    full(
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
        ),
    )
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    conn: Arc<Conn>,
) -> Result<Response<Body>, BoxError> {
    let kind = RequestKind::of(&req);
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let (canned, fault) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.seen.push(SeenRequest {
            kind: kind.clone(),
            headers,
        });
        match st.canned.iter().find(|(on, _, _)| kind.matches(on)) {
            Some((_, status, body)) => (Some((*status, body.clone())), None),
            None => (None, st.take(&kind)),
        }
    };
    if let Some((status, body)) = canned {
        let _ = req.into_body().collect().await;
        return Ok(full(status, body));
    }
    match fault {
        Some(f @ (Fault::SlowDown503 | Fault::InternalError500)) => {
            // Read the request as a server would before answering.
            let _ = req.into_body().collect().await;
            return Ok(if f == Fault::SlowDown503 {
                s3_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SlowDown",
                    "Please reduce your request rate.",
                )
            } else {
                s3_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                )
            });
        }
        Some(Fault::ResetRequestBody) => {
            let want = content_length(req.headers()) / 2;
            let mut body = req.into_body();
            let mut read = 0u64;
            while read < want.max(1) {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    _ => break,
                }
            }
            conn.reset_on_close();
            return Err(format!("fault: reset after {read} bytes of the request body").into());
        }
        _ => {}
    }
    let response = match forward(req, upstream).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(s3_error(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("fault proxy: {e}"),
            ))
        }
    };
    state.lock().unwrap_or_else(|e| e.into_inner()).forwarded += 1;
    let (parts, body) = response.into_parts();
    let half = content_length(&parts.headers) / 2;
    let body = match fault {
        None => body.map_err(BoxError::from).boxed(),
        Some(Fault::StallResponse) => {
            std::future::pending::<()>().await;
            unreachable!("a pending future never completes")
        }
        Some(Fault::ResetResponseBody) => cut(body, half, Cut::Reset(conn)),
        Some(Fault::TruncateResponseBody) => cut(body, half, Cut::Close),
        Some(Fault::StallResponseBody) => cut(body, half, Cut::Stall),
        Some(Fault::SlowDown503 | Fault::InternalError500 | Fault::ResetRequestBody) => {
            unreachable!("answered above")
        }
    };
    Ok(Response::from_parts(parts, body))
}

fn content_length(headers: &hyper::HeaderMap) -> u64 {
    headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sends the request to the server on a new connection, unchanged.
async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
) -> Result<Response<Incoming>, BoxError> {
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(req).await?)
}

/// How a cut body ends.
enum Cut {
    Reset(Arc<Conn>),
    Close,
    Stall,
}

/// The first `keep` bytes of `body`, then the end `how` says. The response
/// keeps its Content-Length header, so the client expects more.
fn cut(body: Incoming, keep: u64, how: Cut) -> Body {
    let stream = futures::stream::unfold(
        (body, 0u64, Some(how)),
        move |(mut body, sent, how)| async move {
            let how = how?;
            if sent >= keep {
                return match how {
                    Cut::Reset(conn) => {
                        conn.reset_on_close();
                        Some((
                            Err(BoxError::from("fault: reset mid-body")),
                            (body, sent, None),
                        ))
                    }
                    Cut::Close => Some((
                        Err(BoxError::from("fault: body truncated")),
                        (body, sent, None),
                    )),
                    Cut::Stall => {
                        std::future::pending::<()>().await;
                        None
                    }
                };
            }
            match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let room = (keep - sent) as usize;
                        if data.len() > room {
                            data.truncate(room);
                        }
                        let n = data.len() as u64;
                        Some((Ok(Frame::data(data)), (body, sent + n, Some(how))))
                    }
                    Err(frame) => Some((Ok(frame), (body, sent, Some(how)))),
                },
                Some(Err(e)) => Some((Err(BoxError::from(e)), (body, sent, None))),
                None => None,
            }
        },
    );
    BodyExt::boxed(StreamBody::new(stream))
}
