//! Parameter set decoding: the payload header alone, a whole payload, and the block-wise readers
//! the server aggregates spooled updates with. Oracle: a decoded set encodes back to the same
//! bytes, and every reader agrees with the whole-buffer decoder.
#![no_main]

use fedhcc_core::params::{ParameterSet, ValueReader, decode_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header = decode_header(data);
    let whole = ParameterSet::decode(data);
    if let Ok(p) = &whole {
        assert_eq!(p.encode(), data, "decode then encode gives the same bytes");
        let (layout, start) = header.as_ref().expect("a decodable payload has a decodable header");
        assert_eq!(layout, p.layout());
        assert_eq!(start + p.numel() * 4, data.len());
        let read = ParameterSet::read_from(&mut &data[..]).expect("the streaming reader agrees");
        assert_eq!(read.encode(), data);
        if p.check_finite().is_ok() {
            let mut r = ValueReader::new(&data[..]).expect("the block reader reads the header");
            let mut out = vec![0f32; r.remaining().min(4096)];
            while r.remaining() > 0 {
                let n = r.remaining().min(out.len());
                r.read(&mut out[..n]).expect("finite values read block-wise");
            }
            r.finish().expect("nothing follows");
        }
    } else if header.is_ok() {
        // A good header with a bad body: the block reader must fail somewhere too, without panicking.
        if let Ok(mut r) = ValueReader::new(&data[..]) {
            let mut out = vec![0f32; r.remaining().min(4096)];
            let mut ok = true;
            while ok && r.remaining() > 0 {
                let n = r.remaining().min(out.len());
                ok = r.read(&mut out[..n]).is_ok();
            }
            if ok {
                assert!(r.finish().is_err(), "the block reader accepted what decode refused");
            }
        }
    }
});
