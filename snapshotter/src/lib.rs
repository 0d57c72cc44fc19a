//! zygote's snapshot format (work in progress).
