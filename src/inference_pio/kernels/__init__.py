"""Native compute kernels. `cpu` holds the AVX2 int4 / int8 kernels (built on first use; when
they cannot be, `cpu.available()` is False and callers keep their plain-torch path);
`reference` holds plain-torch references that emulate them exactly (import it explicitly)."""
