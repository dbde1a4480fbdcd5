#![no_main]
// Any bytes as one manifest file: see `proxy_agent::fuzzing::manifest`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_agent::fuzzing::manifest(data));
