//! libFuzzer drives `dunite::fuzzing::download_target` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::download_target(data));
