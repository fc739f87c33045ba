//! veil guest agent (skeleton).
