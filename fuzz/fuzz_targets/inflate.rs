//! libFuzzer entry for `harness::inflate` (the input layout is documented there).
#![no_main]

#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::inflate(data));
