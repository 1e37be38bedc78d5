#![no_main]
//! `gantry_http::fuzzing::response_head`: see its properties there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = gantry_http::fuzzing::response_head(data);
});
