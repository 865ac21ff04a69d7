//! libFuzzer drives `dunite::fuzzing::bearer_challenge` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::bearer_challenge(data));
