//! The pod's confidential storage, host side: the dm-verity hash
//! tree of each root image ([`verity`]) and the pod's scratch disk
//! ([`scratch`]). The guest does the checking and the encrypting; the host
//! only prepares files and says where they are.

pub mod scratch;
pub mod verity;
