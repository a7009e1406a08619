//! The RESP request parser on arbitrary bytes, consumed the way a connection consumes
//! its buffer: it must never panic, and every command it returns must lie inside the
//! bytes it says it consumed. Run with `scripts/fuzz`.
#![no_main]

use keel::resp::{ParseLimits, parse_command};
use libfuzzer_sys::fuzz_target;

const LIMITS: ParseLimits = ParseLimits { max_bulk: 1 << 20, max_args: 1024, max_inline: 64 * 1024 };

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(parsed)) = parse_command(rest, &LIMITS) {
        assert!(parsed.consumed > 0 && parsed.consumed <= rest.len());
        for range in &parsed.args {
            assert!(range.start <= range.end && range.end <= parsed.consumed);
        }
        rest = &rest[parsed.consumed..];
    }
});
