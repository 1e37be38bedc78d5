#![no_main]
//! `gantry_http::fuzzing::chunked`: see its properties (and the input's layout) there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = gantry_http::fuzzing::chunked(data);
});
