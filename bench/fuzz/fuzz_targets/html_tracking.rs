#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gannet_bench::fuzz::html_tracking(data));
