//! Simulcast layer selection (being written).
