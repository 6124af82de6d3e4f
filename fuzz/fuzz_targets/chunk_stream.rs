//! The streaming payload reader the server checks uploads with (`PayloadReader`), fed the input
//! in chunks of a size the fuzzer picks. Oracle: whatever the chunking, the reader accepts a
//! payload exactly when the whole-buffer decoder does and it holds only finite values, and it
//! hands over the same values at the same offsets.
#![no_main]

use fedhcc_core::params::{ParameterSet, PayloadReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], body)) = data.split_first_chunk::<2>() else { return };
    let step = usize::from(u16::from_le_bytes([a, b])).max(1);
    let mut reader = PayloadReader::new();
    let mut values = Vec::new();
    let mut streamed = Ok(());
    for chunk in body.chunks(step) {
        streamed = reader.push(chunk, |offset, vals| {
            assert_eq!(offset, values.len(), "values arrive in order");
            values.extend_from_slice(vals);
        });
        if streamed.is_err() {
            break;
        }
    }
    let streamed = streamed.and_then(|()| reader.finish());
    let whole = ParameterSet::decode(body);
    match (&streamed, &whole) {
        (Ok(()), Ok(p)) => {
            assert_eq!(p.values().len(), values.len());
            assert!(p.values().iter().zip(&values).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(reader.layout(), Some(p.layout()));
        }
        (Ok(()), Err(e)) => panic!("the stream reader accepted a payload the decoder refuses: {e}"),
        (Err(_), Ok(p)) => assert!(p.check_finite().is_err(), "a finite payload was refused when streamed"),
        (Err(_), Err(_)) => {}
    }
});
