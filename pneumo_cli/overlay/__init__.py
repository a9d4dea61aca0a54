"""`pneumo overlay`: masks drawn on the X-rays, as pictures a doctor can read."""
