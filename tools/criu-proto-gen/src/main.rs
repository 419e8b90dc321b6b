//! Generates Rust types for CRIU's image format from its images/*.proto.
//! Usage: criu-proto-gen CRIU_SRC/images OUT_DIR (see scripts/gen-criu-proto.sh).
fn main() {
    let src = std::env::args().nth(1).expect("criu images dir");
    let out = std::env::args().nth(2).expect("out dir");
    let mut protos: Vec<_> = std::fs::read_dir(&src).unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        // The RPC API, not the image format (and its criu_opts would clash
        // with opts.proto's CRIU_Opts).
        .filter(|p| !p.ends_with("rpc.proto"))
        .collect();
    protos.sort();
    prost_build::Config::new()
        .out_dir(&out)
        .compile_protos(&protos, &[std::path::PathBuf::from(&src)])
        .unwrap();
}
