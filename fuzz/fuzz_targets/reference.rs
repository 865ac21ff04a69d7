//! libFuzzer drives `dunite::fuzzing::reference` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::reference(data));
