#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| telespool_fuzz::config(data));
