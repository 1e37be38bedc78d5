#![no_main]
//! `gantry_gateway::fuzzing::path`: see its properties there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = gantry_gateway::fuzzing::path(data);
});
