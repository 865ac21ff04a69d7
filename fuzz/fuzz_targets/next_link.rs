//! libFuzzer drives `dunite::fuzzing::next_link` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::next_link(data));
