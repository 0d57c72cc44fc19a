//! The handlers, one module per resource. Each parses, authorises (the
//! [`crate::auth::Caller`] extractor) and calls the runtime.

pub mod exec;
pub mod instances;
pub mod masters;
pub mod system;
pub mod transfer;
