pub mod decoder_only;
