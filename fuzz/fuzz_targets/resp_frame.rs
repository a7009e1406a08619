//! The RESP request parser on arbitrary bytes, consumed the way a connection consumes
//! its buffer: it must never panic, every command it returns must lie inside the bytes
//! it says it consumed, and feeding the same bytes in small pieces (resuming) must give
//! the same commands as parsing them at once. Run with `scripts/fuzz`.
#![no_main]

use keel::resp::{ParseLimits, RequestParser, parse_command};
use libfuzzer_sys::fuzz_target;

const LIMITS: ParseLimits = ParseLimits { max_bulk: 1 << 20, max_args: 1024, max_inline: 64 * 1024 };

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let chunk = usize::from(chunk % 16) + 1;

    let mut at_once = Vec::new();
    let mut rest = data;
    while let Ok(Some(parsed)) = parse_command(rest, &LIMITS) {
        assert!(parsed.consumed > 0 && parsed.consumed <= rest.len());
        for range in &parsed.args {
            assert!(range.start <= range.end && range.end <= parsed.consumed);
        }
        at_once.push(parsed.args.iter().map(|r| rest[r.clone()].to_vec()).collect::<Vec<_>>());
        rest = &rest[parsed.consumed..];
    }

    let mut parser = RequestParser::default();
    let mut in_pieces = Vec::new();
    let (mut start, mut end) = (0, 0);
    'feed: while end < data.len() {
        end = (end + chunk).min(data.len());
        loop {
            match parser.parse(&data[start..end], &LIMITS) {
                Ok(Some(parsed)) => {
                    let slice = &data[start..end];
                    in_pieces.push(parsed.args.iter().map(|r| slice[r.clone()].to_vec()).collect::<Vec<_>>());
                    start += parsed.consumed;
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    // Errors may come at different points (a limit seen earlier in one piece), but every
    // command both ways found must be the same, in the same order.
    let common = at_once.len().min(in_pieces.len());
    assert_eq!(at_once[..common], in_pieces[..common]);
});
