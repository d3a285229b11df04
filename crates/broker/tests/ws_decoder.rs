//! The WebSocket decoder is total: arbitrary bytes, and valid or broken frame sequences cut at
//! arbitrary points, never make it panic or hold more than the message limit; valid sequences
//! decode to the messages sent, also when every read is cancelled once before it completes.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use proptest::prelude::*;
use steelyard_broker::ws::{Decoded, Decoder, Incoming, ReadError, Reader, READ_CHUNK};
use tokio::io::{AsyncRead, ReadBuf};

/// Largest control payload: buffered apart from the message, so allowed on top of the limit.
const CONTROL: usize = 125;

#[derive(Clone, Debug)]
enum Message {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

/// How a frame's length is written: the shortest form or a longer one (the decoder takes both).
#[derive(Clone, Copy, Debug)]
enum LenForm {
    Short,
    U16,
    U64,
}

/// One frame, masked as a client must (or not, when testing violations).
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>, form: LenForm) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    match form {
        LenForm::Short if n <= 125 => out.push(bit | n as u8),
        LenForm::Short | LenForm::U16 if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

fn len_form() -> impl Strategy<Value = LenForm> {
    prop_oneof![Just(LenForm::Short), Just(LenForm::U16), Just(LenForm::U64)]
}

fn control_payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=CONTROL)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        4 => prop_oneof![".{0,40}", ".{0,3000}"].prop_map(Message::Text),
        1 => prop::collection::vec(any::<u8>(), 0..2000).prop_map(Message::Binary),
        1 => control_payload().prop_map(Message::Ping),
        1 => control_payload().prop_map(Message::Pong),
    ]
}

/// A message as frames: data split into fragments at `cuts`, with a ping between fragments.
fn encode(m: &Message, cuts: &[usize], form: LenForm, mask: [u8; 4], out: &mut Vec<u8>) {
    let (opcode, bytes) = match m {
        Message::Text(t) => (0x1, t.as_bytes()),
        Message::Binary(b) => (0x2, &b[..]),
        Message::Ping(p) => return out.extend(frame(true, 0x9, p, Some(mask), form)),
        Message::Pong(p) => return out.extend(frame(true, 0xA, p, Some(mask), form)),
    };
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.retain(|p| *p < bytes.len());
    points.sort_unstable();
    points.dedup();
    let mut from = 0;
    let mut first = true;
    for to in points.into_iter().chain([bytes.len()]) {
        let last = to == bytes.len();
        let op = if first { opcode } else { 0x0 };
        out.extend(frame(last, op, &bytes[from..to], Some(mask), form));
        if !last {
            out.extend(frame(true, 0xA, b"between", Some(mask), LenForm::Short));
        }
        first = false;
        from = to;
    }
}

/// What reading `m` yields (pongs yield nothing).
fn expected(m: &Message) -> Option<Incoming> {
    match m {
        Message::Text(t) => Some(Incoming::Text(t.clone())),
        Message::Binary(_) => Some(Incoming::Binary),
        Message::Ping(p) => Some(Incoming::Ping(p.clone().into_boxed_slice())),
        Message::Pong(_) => None,
    }
}

/// Feeds `input` to a decoder in pieces of the given sizes; checks the allocation bound after
/// every call. Returns the messages and the error that ended decoding, if any.
fn decode_in_pieces(
    input: &[u8],
    pieces: &[usize],
    max: usize,
) -> (Vec<Decoded>, Option<ReadError>) {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let mut rest = input;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        let mut piece = &rest[..n];
        rest = &rest[n..];
        while !piece.is_empty() {
            let r = d.decode(&mut piece);
            assert!(
                d.allocated() <= max + CONTROL,
                "holds {} bytes, limit {max}",
                d.allocated()
            );
            match r {
                Ok(Some(x)) => out.push(x),
                Ok(None) => assert!(piece.is_empty(), "stopped with input left and no message"),
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// An `AsyncRead` that hands out its input in pieces and says `Pending` before each one, so
/// that a caller polling once and giving up cancels every read at least once.
struct Trickle {
    input: Vec<u8>,
    at: usize,
    pieces: Vec<usize>,
    turn: usize,
    ready: bool,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        let piece = self
            .pieces
            .get(self.turn % self.pieces.len().max(1))
            .copied()
            .unwrap_or(7)
            .max(1);
        self.turn += 1;
        let n = piece.min(buf.remaining()).min(self.input.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Reads everything through a [`Reader`], dropping each `next()` the first time it is pending.
/// The first `ahead` bytes are handed over as already read (as the HTTP server does with bytes
/// it read past the upgrade request).
fn read_cancelling(
    input: Vec<u8>,
    pieces: Vec<usize>,
    max: usize,
    ahead: usize,
) -> (Vec<Incoming>, Result<(), String>) {
    let ahead = ahead.min(input.len());
    let mut reader = Reader::with_read(
        Trickle {
            input: input[ahead..].to_vec(),
            at: 0,
            pieces,
            turn: 0,
            ready: false,
        },
        max,
        &input[..ahead],
    );
    let mut out = Vec::new();
    loop {
        let Some(r) = reader.next().now_or_never() else {
            assert!(
                reader.allocated() <= max + CONTROL + READ_CHUNK.max(ahead),
                "holds {}",
                reader.allocated()
            );
            continue; // cancelled: the next call must carry on where this one stopped
        };
        match r {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e.to_string())),
        }
    }
}

/// A protocol violation or oversized frame.
#[derive(Clone, Debug)]
enum Broken {
    Unmasked,
    Reserved(u8),
    DataOpcode(u8),
    ControlOpcode(u8),
    FragmentedControl,
    LongControl(usize),
    Continuation,
    Interleaved,
    TooLarge(u64),
    BadUtf8,
}

fn broken() -> impl Strategy<Value = Broken> {
    prop_oneof![
        Just(Broken::Unmasked),
        (1..8u8).prop_map(Broken::Reserved),
        (3..8u8).prop_map(Broken::DataOpcode),
        (0xB..=0xFu8).prop_map(Broken::ControlOpcode),
        Just(Broken::FragmentedControl),
        (126..2000usize).prop_map(Broken::LongControl),
        Just(Broken::Continuation),
        Just(Broken::Interleaved),
        prop_oneof![16_385..100_000u64, Just(u64::MAX), (1u64 << 63)..u64::MAX]
            .prop_map(Broken::TooLarge),
        Just(Broken::BadUtf8),
    ]
}

fn encode_broken(b: &Broken, mask: [u8; 4]) -> (Vec<u8>, &'static str) {
    let m = Some(mask);
    match b {
        Broken::Unmasked => (frame(true, 0x1, b"hi", None, LenForm::Short), "masked"),
        Broken::Reserved(bits) => {
            let mut f = frame(true, 0x1, b"hi", m, LenForm::Short);
            f[0] |= bits << 4;
            (f, "reserved")
        }
        Broken::DataOpcode(op) => (frame(true, *op, b"x", m, LenForm::Short), "opcode"),
        Broken::ControlOpcode(op) => (frame(true, *op, b"x", m, LenForm::Short), "opcode"),
        Broken::FragmentedControl => (frame(false, 0x9, b"x", m, LenForm::Short), "control"),
        Broken::LongControl(n) => (frame(true, 0x9, &vec![0; *n], m, LenForm::Short), "control"),
        Broken::Continuation => (frame(true, 0x0, b"x", m, LenForm::Short), "continuation"),
        Broken::Interleaved => {
            let mut f = frame(false, 0x1, b"a", m, LenForm::Short);
            f.extend(frame(true, 0x2, b"b", m, LenForm::Short));
            (f, "previous")
        }
        Broken::TooLarge(len) => {
            // Only the header and a little payload: the limit is enforced on the header.
            let mut f = vec![0x82, 0x80 | 127];
            f.extend(len.to_be_bytes());
            f.extend(mask);
            f.extend([0u8; 64]);
            (f, "exceeds")
        }
        Broken::BadUtf8 => (
            frame(true, 0x1, &[b'a', 0xff, 0xfe], m, LenForm::Short),
            "UTF-8",
        ),
    }
}

const MAX: usize = 16 * 1024;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(
        input in prop::collection::vec(any::<u8>(), 0..4096),
        pieces in prop::collection::vec(1..300usize, 1..8),
        max in 0..8192usize,
        ahead in 0..4096usize,
    ) {
        decode_in_pieces(&input, &pieces, max);
        let _ = read_cancelling(input.clone(), pieces.clone(), max, 0);
        let _ = read_cancelling(input, pieces, max, ahead);
    }

    #[test]
    fn valid_sequences_decode_to_the_messages_sent(
        messages in prop::collection::vec((message(), prop::collection::vec(any::<usize>(), 0..4), len_form(), any::<[u8; 4]>()), 0..12),
        pieces in prop::collection::vec(1..600usize, 1..8),
        close in any::<bool>(),
        ahead in any::<prop::sample::Index>(),
    ) {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for (m, cuts, form, mask) in &messages {
            encode(m, cuts, *form, *mask, &mut input);
            want.extend(expected(m));
        }
        if close {
            input.extend(frame(true, 0x8, &[3, 232], Some([1, 2, 3, 4]), LenForm::Short));
            input.extend(b"ignored after the close");
        }
        // As tight as it gets: the largest message is exactly at the limit.
        let max = messages.iter().map(|(m, ..)| match m {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        }).max().unwrap_or(0);
        let (decoded, err) = decode_in_pieces(&input, &pieces, max);
        prop_assert!(err.is_none(), "{err:?}");
        let mut got: Vec<Incoming> = Vec::new();
        for d in decoded {
            match d {
                Decoded::Message(m) => got.push(m),
                Decoded::Close => prop_assert!(close),
            }
        }
        prop_assert_eq!(&got, &want);
        let (read, end) = read_cancelling(input.clone(), pieces.clone(), max, 0);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&read, &want);
        // Some bytes already read before the reader starts: the same messages.
        let (read, end) = read_cancelling(input.clone(), pieces, max, ahead.index(input.len() + 1));
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(read, want);
    }

    #[test]
    fn broken_sequences_are_refused_after_the_good_messages(
        before in prop::collection::vec((message(), len_form(), any::<[u8; 4]>()), 0..4),
        bad in broken(),
        mask in any::<[u8; 4]>(),
        pieces in prop::collection::vec(1..600usize, 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for (m, form, mask) in &before {
            encode(m, &[], *form, *mask, &mut input);
            want.extend(expected(m));
        }
        let good = input.len();
        let (tail, complaint) = encode_broken(&bad, mask);
        input.extend(&tail);
        input.extend(frame(true, 0x1, b"never read", Some(mask), LenForm::Short));
        let (decoded, err) = decode_in_pieces(&input, &pieces, MAX);
        let err = err.expect("the broken frame is refused").to_string();
        prop_assert!(err.contains(complaint), "{bad:?}: {err}");
        let got: Vec<Incoming> = decoded.into_iter().filter_map(|d| match d {
            Decoded::Message(m) => Some(m),
            Decoded::Close => None,
        }).collect();
        prop_assert_eq!(&got, &want);
        let (read, end) = read_cancelling(input.clone(), pieces.clone(), MAX, 0);
        prop_assert!(end.as_ref().is_err_and(|e| e.contains(complaint)), "{bad:?}: {end:?}");
        prop_assert_eq!(&read, &want);
        // Cut anywhere inside the broken part: an error or a clean stop, never a message.
        let at = good + cut.index(tail.len());
        let (read, _) = read_cancelling(input[..at].to_vec(), pieces, MAX, 0);
        prop_assert_eq!(read, want);
    }
}
