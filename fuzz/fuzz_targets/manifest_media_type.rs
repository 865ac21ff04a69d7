//! libFuzzer drives `dunite::fuzzing::manifest_media_type` (the property is documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dunite::fuzzing::manifest_media_type(data));
