//! The command line's verbs, one file each, apart from `warmer run` (the
//! [`crate::supervisor`]). Each gathers what it shows from the layers below
//! and returns it typed; [`crate::cli`] prints it and picks the exit code.
//!
//! May call anything below it; nothing calls into it but `cli` (and the
//! tests).

pub mod adopt;
pub mod bench;
pub mod cache;
pub mod docs;
pub mod inspect;
pub mod lint;
pub mod rollback;
pub mod status;
pub mod units;
