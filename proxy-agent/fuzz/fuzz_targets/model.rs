#![no_main]
// Any bytes as a sequence of file edits: see `proxy_agent::fuzzing::model`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_agent::fuzzing::model(data));
