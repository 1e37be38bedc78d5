// supervisor: unsafe needed for pre_exec; see lib.rs
#![deny(unsafe_code)]
