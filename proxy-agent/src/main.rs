static OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/proxy.bpf.o"));
fn main(){ println!("{}", OBJ.len()); }
