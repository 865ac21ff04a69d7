//! libFuzzer drives `dunite::fuzzing::tag_keys` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::tag_keys(data));
