//! libFuzzer drives `dunite::fuzzing::url_key` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::url_key(data));
