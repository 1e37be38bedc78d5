//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay tests: the parsers that
//! read bytes from clients and instances, each run on arbitrary input with the properties it
//! must keep checked (a failed check panics, which is what a fuzzer reports). Not an API.

use bytes::{BufMut, BytesMut};

use crate::codec::{Decoded, Decoder};
use crate::h1server::{self, BodyFraming, HeadError, Parsed};

/// How a request head was taken, for the replay tests to check a seed's expectation.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadOutcome {
    Request,
    Handoff,
    Incomplete,
    Refused,
}

/// The in-task server's request head parser on `data`. Properties: no panic; a head accepted
/// whole is reported incomplete on any strict prefix of it (a request is never acted on before
/// its head ends); an accepted request has at most one `Host`, never both `Content-Length` and
/// `Transfer-Encoding`, a `Transfer-Encoding` only as a single `chunked` on HTTP/1.1, is never
/// a WebSocket upgrade as the pipeline tells one (those go to hyper, whole), and its fields
/// come out as they came in (each name's values in order).
pub fn request_head(data: &[u8]) -> HeadOutcome {
    let max_headers = 100;
    let mut buf = BytesMut::from(data);
    let outcome = match h1server::parse(&mut buf, max_headers) {
        Ok(None) => return HeadOutcome::Incomplete,
        Err(HeadError::Malformed(_) | HeadError::TooLarge | HeadError::Timeout) => {
            return HeadOutcome::Refused
        }
        Ok(Some(Parsed::Handoff)) => {
            assert_eq!(
                buf.len(),
                data.len(),
                "a hand-off leaves the buffer as it was"
            );
            HeadOutcome::Handoff
        }
        Ok(Some(Parsed::Request(req, _meta, framing))) => {
            let h = req.headers();
            let length = h
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            match framing {
                BodyFraming::None => assert!(
                    !h.contains_key(http::header::TRANSFER_ENCODING) && length.unwrap_or(0) == 0
                ),
                BodyFraming::Length(n) => assert_eq!(length, Some(n)),
                BodyFraming::Chunked => {
                    assert!(length.is_none());
                    assert_eq!(req.version(), http::Version::HTTP_11);
                    let te: Vec<_> = h.get_all(http::header::TRANSFER_ENCODING).iter().collect();
                    assert_eq!(te.len(), 1);
                    assert!(te[0]
                        .as_bytes()
                        .trim_ascii()
                        .eq_ignore_ascii_case(b"chunked"));
                }
            }
            // The pipeline's test (gantry-gateway `is_websocket_upgrade`): never true here.
            let websocket = req.version() == http::Version::HTTP_11
                && h.get(http::header::UPGRADE)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
                && h.get_all(http::header::CONNECTION).iter().any(|v| {
                    v.as_bytes()
                        .split(|c| *c == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
                });
            assert!(!websocket, "an upgrade kept by the in-task server");
            assert!(h.get_all(http::header::HOST).iter().count() <= 1);
            assert!(
                !(h.contains_key(http::header::CONTENT_LENGTH)
                    && h.contains_key(http::header::TRANSFER_ENCODING)),
                "both framings accepted"
            );
            // The fields as httparse saw them, in order.
            let mut slots = [httparse::EMPTY_HEADER; 100];
            let mut again = httparse::Request::new(&mut slots);
            let Ok(httparse::Status::Complete(_)) = again.parse(data) else {
                panic!("accepted a head httparse does not complete");
            };
            // Every field kept, a name's values in the order they came.
            assert_eq!(again.headers.len(), h.len());
            for a in again.headers.iter() {
                let theirs: Vec<&[u8]> = again
                    .headers
                    .iter()
                    .filter(|b| b.name.eq_ignore_ascii_case(a.name))
                    .map(|b| b.value)
                    .collect();
                let ours: Vec<&[u8]> = h.get_all(a.name).iter().map(|v| v.as_bytes()).collect();
                assert_eq!(theirs, ours, "the values of {:?}", a.name);
            }
            HeadOutcome::Request
        }
    };
    // The head's length, as httparse counts it; an accepted request's is what was taken.
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let Ok(httparse::Status::Complete(head_len)) = httparse::Request::new(&mut slots).parse(data)
    else {
        panic!("accepted a head httparse does not complete");
    };
    if outcome == HeadOutcome::Request {
        assert_eq!(
            data.len() - buf.len(),
            head_len,
            "took more or less than the head"
        );
    }
    // Every strict prefix of the head is incomplete.
    for cut in [
        head_len / 2,
        head_len.saturating_sub(1),
        head_len.saturating_sub(2),
    ] {
        if cut == 0 || cut >= head_len {
            continue;
        }
        let mut part = BytesMut::from(&data[..cut]);
        match h1server::parse(&mut part, max_headers) {
            Ok(None) => {}
            Ok(Some(_)) => panic!("a prefix of {cut} bytes parsed as a whole head"),
            Err(_) => panic!("a prefix of {cut} bytes of an accepted head was refused"),
        }
    }
    outcome
}

/// The client's response head reader on `data` (interim responses skipped). Properties: no
/// panic; a final head is not 1xx (but 101); the fields it writes on to a client re-parse to
/// exactly the fields it read (less the hop-by-hop ones): nothing an instance sends can split a
/// response or smuggle a field past the framing.
pub fn response_head(data: &[u8]) -> Option<u16> {
    let mut buf = BytesMut::from(data);
    let Ok(Some((status, _version, raw))) = crate::h1client::final_head(&mut buf) else {
        return None;
    };
    assert!(!status.is_informational() || status.as_u16() == 101);
    let _ = raw.to_map(0);
    let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
    raw.write_fields(&mut out, true);
    out.extend_from_slice(b"\r\n");
    let expected: Vec<(&[u8], &[u8])> = raw
        .fields()
        .filter(|f| f.kind & crate::codec::F_HOP == 0)
        .map(|f| (f.name(raw.bytes()), f.value_bytes(raw.bytes())))
        .collect();
    let mut back = BytesMut::from(&out[..]);
    let Ok(Some((_, _, reparsed))) = crate::h1client::final_head(&mut back) else {
        panic!("the head written to the client does not parse");
    };
    assert!(back.is_empty(), "the written head has bytes after its end");
    let got: Vec<(&[u8], &[u8])> = reparsed
        .fields()
        .map(|f| (f.name(reparsed.bytes()), f.value_bytes(reparsed.bytes())))
        .collect();
    assert_eq!(got, expected, "fields changed on the way to the client");
    Some(status.as_u16())
}

/// What a body decoded to: its data, its trailers' count, whether it ended, and the bytes left
/// after it; or the error.
type BodyResult = Result<(Vec<u8>, usize, bool, Vec<u8>), &'static str>;

fn decode_all(mut decoder: Decoder, pieces: &[&[u8]]) -> BodyResult {
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut trailers = 0;
    let last = pieces.len().saturating_sub(1);
    for (i, piece) in pieces.iter().enumerate() {
        buf.put_slice(piece);
        let eof = i == last;
        // Each call consumes bytes or changes state; bounded all the same.
        for _ in 0..=buf.len() + 8 {
            match decoder.decode(&mut buf, eof)? {
                Decoded::Data(d) => {
                    assert!(!d.is_empty(), "empty data frame");
                    data.extend_from_slice(&d);
                }
                Decoded::Trailers(t) => trailers += t.len(),
                Decoded::End => {
                    // What is after the body: in the buffer, and still to arrive.
                    let mut after = buf.to_vec();
                    pieces[i + 1..]
                        .iter()
                        .for_each(|p| after.extend_from_slice(p));
                    return Ok((data, trailers, true, after));
                }
                Decoded::NeedMore => break,
            }
        }
    }
    Ok((data, trailers, false, buf.to_vec()))
}

/// The chunked body decoder on a body, whole and cut into pieces. `input`: its first byte says
/// how many of the next bytes (up to 15) are the pieces' lengths; the rest is the body. Properties:
/// no panic; the data, trailers, end and leftover bytes do not depend on how the bytes arrived
/// (a body framed one way when read at once and another when read in pieces would be a
/// smuggling hole); decoded data is never more than the input.
pub fn chunked(input: &[u8]) -> bool {
    let Some((&n, rest)) = input.split_first() else {
        return false;
    };
    let (cuts, data) = rest.split_at(usize::from(n % 16).min(rest.len()));
    let whole = decode_all(Decoder::chunked(), &[data]);
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts {
        let n = usize::from(*c).min(data.len() - at);
        pieces.push(&data[at..at + n]);
        at += n;
    }
    pieces.push(&data[at..]);
    let split = decode_all(Decoder::chunked(), &pieces);
    match (&whole, &split) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.0, b.0, "data differs");
            assert_eq!(a.1, b.1, "trailers differ");
            assert_eq!(a.2, b.2, "end differs");
            if a.2 {
                assert_eq!(a.3, b.3, "bytes after the body differ");
            }
            assert!(a.0.len() <= data.len());
        }
        (Err(_), Err(_)) => {}
        _ => panic!("whole: {whole:?}; in pieces: {split:?}"),
    }
    matches!(whole, Ok((_, _, true, _)))
}
