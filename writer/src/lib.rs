//! sluice writer.
