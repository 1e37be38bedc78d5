//! HTTP/1.1 pieces shared by the in-task client (`h1.rs`) and server (`h1server.rs`): the body
//! decoder (RFC 9112 §6 and §7.1: length, chunked with extensions and trailers, or until close),
//! socket writes on a shared `TcpStream`, and the `Date` header.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer block accepted.
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    /// After the last chunk; how far the trailer block was already searched for its end.
    Trailers(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(ChunkState),
    Close,
    Done,
}

/// What the buffer yielded.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete; bytes after it stay in the buffer.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Incremental decoder of one message body, reading from a connection's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn length(n: u64) -> Self {
        Self {
            state: if n == 0 {
                State::Done
            } else {
                State::Length(n)
            },
        }
    }
    pub fn chunked() -> Self {
        Self {
            state: State::Chunked(ChunkState::Size),
        }
    }
    /// Delimited by the end of the connection (responses only).
    pub fn close() -> Self {
        Self {
            state: State::Close,
        }
    }
    pub fn done() -> Self {
        Self { state: State::Done }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// What the body still holds, for `http_body::Body::size_hint`.
    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining() {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }

    /// Bytes left when the framing says so (a `Content-Length` body).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Take what `buf` holds of the body. `eof`: the peer closed and nothing more will come.
    pub fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, &'static str> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) => {
                    if !buf.is_empty() {
                        let n = (buf.len() as u64).min(left) as usize;
                        let data = take_front(buf, n);
                        let left = left - n as u64;
                        self.state = if left == 0 {
                            State::Done
                        } else {
                            State::Length(left)
                        };
                        return Ok(Decoded::Data(data));
                    }
                    if eof {
                        return Err("connection closed inside the body");
                    }
                    return Ok(Decoded::NeedMore);
                }
                State::Close => {
                    if !buf.is_empty() {
                        return Ok(Decoded::Data(take_front(buf, buf.len())));
                    }
                    if eof {
                        self.state = State::Done;
                        return Ok(Decoded::End);
                    }
                    return Ok(Decoded::NeedMore);
                }
                State::Chunked(cs) => {
                    let progressed = self.chunk_step(cs, buf)?;
                    match progressed {
                        Some(Decoded::NeedMore) => {
                            if eof {
                                return Err("connection closed inside a chunked body");
                            }
                            return Ok(Decoded::NeedMore);
                        }
                        Some(d) => return Ok(d),
                        None => continue,
                    }
                }
            }
        }
    }

    /// One step of the chunked decoder: `None` = state advanced, go on.
    fn chunk_step(
        &mut self,
        cs: ChunkState,
        buf: &mut BytesMut,
    ) -> Result<Option<Decoded>, &'static str> {
        match cs {
            ChunkState::Size => {
                // The limit holds however the line arrives (whole, or in pieces).
                let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
                let Some(i) = crlf(window) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk size line too long");
                    }
                    return Ok(Some(Decoded::NeedMore));
                };
                let size = chunk_size(&buf[..i]).ok_or("bad chunk size")?;
                buf.advance(i + 2);
                self.state = State::Chunked(if size == 0 {
                    ChunkState::Trailers(0)
                } else {
                    ChunkState::Data(size)
                });
                Ok(None)
            }
            ChunkState::Data(left) => {
                if buf.is_empty() {
                    return Ok(Some(Decoded::NeedMore));
                }
                let n = (buf.len() as u64).min(left) as usize;
                let data = take_front(buf, n);
                let left = left - n as u64;
                self.state = State::Chunked(if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                });
                Ok(Some(Decoded::Data(data)))
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Some(Decoded::NeedMore));
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF");
                }
                buf.advance(2);
                self.state = State::Chunked(ChunkState::Size);
                Ok(None)
            }
            ChunkState::Trailers(scanned) => {
                if buf.len() < 2 {
                    return Ok(Some(Decoded::NeedMore));
                }
                if &buf[..2] == b"\r\n" {
                    buf.advance(2);
                    self.state = State::Done;
                    return Ok(Some(Decoded::End));
                }
                // Searched from where the last search stopped (a block arriving a byte at a
                // time is not searched again from its start each time), within the limit
                // however the block arrives.
                let from = (scanned as usize).saturating_sub(3);
                let window = &buf[from..buf.len().min(MAX_TRAILERS + 4)];
                let Some(end) = window
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| from + p)
                else {
                    if buf.len() > MAX_TRAILERS {
                        return Err("trailers too large");
                    }
                    self.state = State::Chunked(ChunkState::Trailers(buf.len() as u32));
                    return Ok(Some(Decoded::NeedMore));
                };
                let block = buf.split_to(end + 4);
                self.state = State::Done;
                Ok(Some(Decoded::Trailers(parse_fields(&block[..end]))))
            }
        }
    }
}

/// The size of a chunk-size line (RFC 9112 §7.1: `chunk-size [ BWS ";" chunk-ext ]`): hex
/// digits from its first byte (at most 16), optional spaces or tabs, then nothing or extensions
/// without control bytes. Anything looser (a leading space, a bare LF, a CR inside) is refused:
/// a proxy that reads such a line another way would frame the body differently.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let ws = rest
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t'))
        .count();
    let rest = &rest[ws..];
    let ext_ok = |ext: &[u8]| {
        ext.iter()
            .all(|c| *c == b'\t' || (*c >= 0x20 && *c != 0x7f))
    };
    if !(rest.is_empty() || (rest[0] == b';' && ext_ok(&rest[1..]))) {
        return None;
    }
    Some(
        line[..digits]
            .iter()
            .fold(0u64, |acc, c| (acc << 4) | u64::from(hex_val(*c))),
    )
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Where a header line's name and value sit in the buffer it was parsed from: lets the head be
/// split off (and frozen) before its fields are built, so that values share those bytes.
#[derive(Clone, Copy, Default)]
pub struct FieldAt {
    name: (u32, u32),
    value: (u32, u32),
    /// What the name is, for the few names framing and forwarding care about (`F_*`).
    pub kind: u8,
}

/// Hop-by-hop (RFC 9110 §7.6.1): never forwarded.
pub const F_HOP: u8 = 1;
pub const F_LENGTH: u8 = 2;
pub const F_DATE: u8 = 4;
pub const F_CONNECTION: u8 = 8;
pub const F_TRANSFER_ENCODING: u8 = 16;
pub const F_HOST: u8 = 32;
pub const F_UPGRADE: u8 = 64;
pub const F_TE: u8 = 128;

/// The `F_*` kind of a header name (any case).
pub fn name_kind(n: &[u8]) -> u8 {
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    match n.len() {
        2 if is("te") => F_HOP | F_TE,
        4 if is("date") => F_DATE,
        4 if is("host") => F_HOST,
        7 if is("upgrade") => F_HOP | F_UPGRADE,
        7 if is("trailer") => F_HOP,
        10 if is("connection") => F_HOP | F_CONNECTION,
        10 if is("keep-alive") => F_HOP,
        14 if is("content-length") => F_LENGTH,
        16 if is("proxy-connection") => F_HOP,
        17 if is("transfer-encoding") => F_HOP | F_TRANSFER_ENCODING,
        _ => 0,
    }
}

impl FieldAt {
    pub fn of(base: &[u8], h: &httparse::Header<'_>) -> Self {
        let at = |s: &[u8]| {
            (
                (s.as_ptr() as usize - base.as_ptr() as usize) as u32,
                s.len() as u32,
            )
        };
        Self {
            name: at(h.name.as_bytes()),
            value: at(h.value),
            kind: name_kind(h.name.as_bytes()),
        }
    }

    pub fn value_bytes<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        &head[self.value.0 as usize..(self.value.0 + self.value.1) as usize]
    }

    pub fn name<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        &head[self.name.0 as usize..(self.name.0 + self.name.1) as usize]
    }

    /// The value, sharing `head`'s bytes.
    pub fn value(&self, head: &Bytes) -> Result<HeaderValue, &'static str> {
        let (at, len) = (self.value.0 as usize, self.value.1 as usize);
        HeaderValue::from_maybe_shared(head.slice(at..at + len)).map_err(|_| "invalid header value")
    }
}

/// Largest piece of a buffer that `take_front` copies rather than shares.
const COPY_MAX: usize = 1024;

/// The first `n` bytes of `buf`, taken off it. Small pieces are copied: splitting would turn
/// the buffer into a shared one, with an atomic reference count that every piece increments
/// and decrements (on memory gone cold by the time the piece is dropped, at many connections),
/// while a small copy costs an allocation and leaves the buffer to be reused as it is. Large
/// pieces are shared, not copied.
pub fn take_front(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= COPY_MAX {
        let piece = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        piece
    } else {
        buf.split_to(n).freeze()
    }
}

/// Fields kept inline in a `RawHead`; more go on the heap.
const INLINE_FIELDS: usize = 12;

/// A response head as the instance sent it: its bytes and where each field sits. It is written to
/// an HTTP/1.1 client as it is (hop-by-hop fields skipped), and turned into a `HeaderMap` only
/// when something has to read or edit it (a cache, header changes, HTTP/2, hyper).
pub struct RawHead {
    bytes: Bytes,
    inline: [FieldAt; INLINE_FIELDS],
    len: usize,
    more: Vec<FieldAt>,
    /// `Connection` names other fields as hop-by-hop: only the map path removes those.
    pub needs_map: bool,
}

impl Default for RawHead {
    fn default() -> Self {
        Self::new()
    }
}

impl RawHead {
    pub fn new() -> Self {
        Self {
            bytes: Bytes::new(),
            inline: [FieldAt::default(); INLINE_FIELDS],
            len: 0,
            more: Vec::new(),
            needs_map: false,
        }
    }

    /// The head's bytes, once split off the read buffer (the fields' offsets point into them).
    pub fn set_bytes(&mut self, bytes: Bytes) {
        self.bytes = bytes;
    }

    pub fn push(&mut self, f: FieldAt) {
        if self.len < INLINE_FIELDS {
            self.inline[self.len] = f;
        } else {
            self.more.push(f);
        }
        self.len += 1;
    }

    pub fn fields(&self) -> impl Iterator<Item = &FieldAt> {
        self.inline[..self.len.min(INLINE_FIELDS)]
            .iter()
            .chain(self.more.iter())
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append the fields that go to the client as `name: value` lines: not hop-by-hop, and not
    /// `Content-Length` unless `keep_length` (the writer frames the body itself). Returns which
    /// `F_*` kinds were written.
    pub fn write_fields(&self, out: &mut Vec<u8>, keep_length: bool) -> u8 {
        let mut written = 0;
        for f in self.fields() {
            if f.kind & F_HOP != 0 || (f.kind & F_LENGTH != 0 && !keep_length) {
                continue;
            }
            written |= f.kind;
            out.extend_from_slice(f.name(&self.bytes));
            out.extend_from_slice(b": ");
            out.extend_from_slice(f.value_bytes(&self.bytes));
            out.extend_from_slice(b"\r\n");
        }
        written
    }

    /// Every field, in a map (values share the head's bytes).
    pub fn to_map(&self, extra: usize) -> Result<HeaderMap, &'static str> {
        let mut map = take_map(self.len + extra);
        for f in self.fields() {
            let name =
                HeaderName::from_bytes(f.name(&self.bytes)).map_err(|_| "bad header name")?;
            map.append(name, f.value(&self.bytes)?);
        }
        Ok(map)
    }
}

/// Header maps of finished messages, cleared and kept per thread for the next head: building a
/// map costs two allocations, and every proxied request builds two.
pub fn take_map(capacity: usize) -> HeaderMap {
    let reused = MAPS.with(|m| m.borrow_mut().pop());
    match reused {
        Some(mut h) => {
            h.reserve(capacity);
            h
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Give back a map nobody needs any more (its values' bytes are released now).
pub fn recycle_map(mut h: HeaderMap) {
    if h.capacity() > MAX_RECYCLED_CAPACITY {
        return;
    }
    h.clear();
    MAPS.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() < MAX_RECYCLED_MAPS {
            m.push(h);
        }
    });
}

const MAX_RECYCLED_MAPS: usize = 64;
const MAX_RECYCLED_CAPACITY: usize = 64;

thread_local! {
    static MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Position of "\r\n" in `b`.
pub fn crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Header fields of a trailer block (invalid lines are skipped).
fn parse_fields(block: &[u8]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for line in block.split(|c| *c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|c| *c == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            out.append(n, v);
        }
    }
    out
}

/// Trailer fields as an HTTP/1.1 trailer block (after the last chunk's size line).
pub fn encode_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (k, v) in fields {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// One read from `stream` into `buf`, without waiting (`WouldBlock` when nothing is there). An
/// empty `buf` is filled from a per-thread scratch buffer and gets exactly the bytes read (a
/// small allocation, whatever the head's size, and nothing held by idle connections); a partial
/// head grows its buffer in place.
pub fn try_read_into(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if !buf.is_empty() {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        return try_read_buf(stream, buf);
    }
    with_scratch(|s| {
        let want = s.len();
        let n = read_drained(stream, want, || crate::sys::recv(stream, &mut s[..]))?;
        *buf = BytesMut::from(&s[..n]);
        Ok(n)
    })
}

/// Run `f` with this thread's read scratch buffer (16 KiB, initialized once).
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_empty() {
            s.resize(SCRATCH_BYTES, 0);
        }
        f(&mut s[..])
    })
}

/// `TcpStream::try_read_buf` into `buf`'s spare capacity (which must not be zero), forgetting
/// the socket's readiness after a short read (see `read_drained`).
pub fn try_read_buf(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let want = buf.capacity() - buf.len();
    read_drained(stream, want, || crate::sys::recv_buf(stream, buf))
}

/// One non-blocking read of up to `want` bytes. A read that got fewer (but some) emptied the
/// socket's receive queue, so the socket's cached readiness is cleared too: the next wait goes
/// to epoll, where any later arrival is a new edge, instead of a read that fails with EAGAIN
/// (one syscall per request saved; nginx's `ngx_unix_recv` does the same). tokio clears
/// readiness only if no event arrived since the read began, so no wake-up is lost.
fn read_drained(
    stream: &TcpStream,
    want: usize,
    read: impl FnOnce() -> std::io::Result<usize>,
) -> std::io::Result<usize> {
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = read()?;
        got = Some(n);
        if n > 0 && n < want {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => r,
    }
}

const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write all of `buf` to a stream shared by reference (no `&mut` needed).
pub async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match crate::sys::try_send(stream, buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write `a` then `b` with as few syscalls as the kernel allows (one `writev` usually).
pub async fn write_all2(stream: &TcpStream, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() {
        let bufs = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
        match crate::sys::try_send_vectored(stream, &bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) if n >= a.len() => {
                b = &b[n - a.len()..];
                a = &[];
            }
            Ok(n) => a = &a[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    write_all(stream, b).await
}

/// The IMF-fixdate of `secs` since the Unix epoch (RFC 9110 §5.6.7).
pub fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem / 60) % 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |o: &mut [u8], v: u64| {
        o[0] = b'0' + (v / 10) as u8;
        o[1] = b'0' + (v % 10) as u8;
    };
    two(&mut out[5..7], day as u64);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    let y = year.clamp(0, 9999) as u64;
    two(&mut out[12..14], y / 100);
    two(&mut out[14..16], y % 100);
    two(&mut out[17..19], h);
    two(&mut out[20..22], m);
    two(&mut out[23..25], s);
    out
}

/// The `Date` value at `now` (a clock read the caller made anyway), formatted once per second
/// per thread. The wall clock is read once a minute per thread: `now` is placed against the
/// last reading, so a response costs no clock read of its own.
pub fn date_at(now: std::time::Instant) -> [u8; 29] {
    use std::cell::Cell;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
    thread_local! {
        static BASE: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let secs = BASE.with(|b| {
        let (at, unix_ms) = match b.get() {
            Some((at, ms)) if now >= at && now - at < Duration::from_secs(60) => (at, ms),
            _ => {
                let ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                b.set(Some((now, ms)));
                (now, ms)
            }
        };
        (unix_ms + (now - at).as_millis() as u64) / 1000
    });
    CACHED.with(|c| {
        let (at, v) = c.get();
        if at == secs {
            v
        } else {
            let v = http_date(secs);
            c.set((secs, v));
            v
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A decoded body: its bytes, its trailers, and what followed it.
    type Whole = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    fn all(d: &mut Decoder, input: &[u8]) -> Result<Whole, &'static str> {
        // Feed one byte at a time: every split point must work.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = None;
        let mut rest = input;
        loop {
            match d.decode(&mut buf, false)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((out, trailers, buf.to_vec())),
                Decoded::NeedMore => {
                    let Some((first, tail)) = rest.split_first() else {
                        d.decode(&mut buf, true)?;
                        return Ok((out, trailers, buf.to_vec()));
                    };
                    buf.extend_from_slice(&[*first]);
                    rest = tail;
                }
            }
        }
    }

    #[test]
    fn chunked_with_extensions_trailers_and_what_follows() {
        let (body, trailers, rest) = all(
            &mut Decoder::chunked(),
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\nGET /next",
        )
        .unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "11");
        assert_eq!(rest, b"");
        let (body, trailers, _) = all(&mut Decoder::chunked(), b"3\r\nabc\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        assert!(trailers.is_none());
    }

    #[test]
    fn bad_chunks_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n"[..],
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b"\r\n",
        ] {
            assert!(all(&mut Decoder::chunked(), bad).is_err(), "{bad:?}");
        }
        // Truncated: the peer closed inside the body.
        assert!(all(&mut Decoder::chunked(), b"5\r\nhel").is_err());
        assert!(all(&mut Decoder::length(10), b"short").is_err());
    }

    #[test]
    fn length_and_close_delimited() {
        let mut buf = BytesMut::from(&b"helloGET"[..]);
        let mut d = Decoder::length(5);
        assert!(matches!(d.decode(&mut buf, false).unwrap(), Decoded::Data(b) if b == "hello"));
        assert!(d.is_done());
        assert_eq!(&buf[..], b"GET");
        let (body, _, _) = all(&mut Decoder::close(), b"until the end").unwrap();
        assert_eq!(body, b"until the end");
    }

    #[test]
    fn raw_heads_skip_hop_by_hop_fields_when_written() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\nDate: x\r\nX-A: b\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut slots);
        let n = match resp.parse(text).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial"),
        };
        let mut raw = RawHead::new();
        for h in resp.headers.iter() {
            raw.push(FieldAt::of(text, h));
        }
        raw.set_bytes(Bytes::copy_from_slice(&text[..n]));
        let mut out = Vec::new();
        let kinds = raw.write_fields(&mut out, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Content-Type: text/plain\r\nDate: x\r\nX-A: b\r\n"
        );
        assert_eq!(kinds & F_DATE, F_DATE);
        let mut out = Vec::new();
        assert_eq!(raw.write_fields(&mut out, true) & F_LENGTH, F_LENGTH);
        let map = raw.to_map(0).unwrap();
        assert_eq!(map.len(), 7, "the map keeps every field: {map:?}");
        assert_eq!(map["x-a"], "b");
        assert_eq!(name_kind(b"Proxy-Connection"), F_HOP);
        assert_eq!(name_kind(b"x-other"), 0);
    }

    #[test]
    fn dates() {
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date(1_709_210_096), b"Thu, 29 Feb 2024 12:34:56 GMT");
    }

    #[test]
    fn dates_follow_the_monotonic_clock_between_wall_clock_readings() {
        use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let d = date_at(now);
        assert!(d == http_date(wall) || d == http_date(wall + 1), "{:?}", d);
        // Ten seconds later by the monotonic clock is ten seconds later on the page.
        let later = date_at(now + Duration::from_secs(10));
        assert!(
            later == http_date(wall + 10) || later == http_date(wall + 11),
            "{:?}",
            later
        );
    }
}
