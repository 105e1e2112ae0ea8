/* Decode only the rows and columns of a JPEG that a crop needs (libjpeg's jpeg_skip_scanlines and
 * jpeg_crop_scanline), for the random-resized-crop and centre-crop loaders.
 *
 * Built on first use by data_pipelines/jpeg_region.py; called from FFCV's numba pipeline through
 * ctypes. The region's pixels are exactly those of a full decode with TurboJPEG's defaults as FFCV
 * uses them (fast integer IDCT, fancy upsampling): fancy upsampling reads one neighbour on each
 * side, so PAD more columns are decoded on either side of the region (jpeg_crop_scanline widens
 * further, to whole iMCUs); vertical context is kept by libjpeg across skipped rows.
 */
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

#define PAD 16

struct error_jump {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
};

static void jump_on_error(j_common_ptr cinfo) {
    longjmp(((struct error_jump *)cinfo->err)->jump, 1);
}

static void keep_quiet(j_common_ptr cinfo) { (void)cinfo; }

/* Rows y0 .. y0+h-1 and (at least) columns x0 .. x0+w-1 of the JPEG in data[0 .. size-1], as RGB
 * rows of geometry[1] pixels into out (capacity bytes); geometry[0] is the column of x0 in them.
 * Returns 0; -1 for data libjpeg cannot decode; -2 when out is too small; -3 for a region
 * outside the image. */
int ss_decode_region(const unsigned char *data, unsigned long size, int y0, int x0, int h, int w,
                     unsigned char *out, long capacity, int *geometry) {
    struct jpeg_decompress_struct cinfo;
    struct error_jump error;
    volatile int status = 0;
    cinfo.err = jpeg_std_error(&error.manager);
    error.manager.error_exit = jump_on_error;
    error.manager.output_message = keep_quiet;
    jpeg_create_decompress(&cinfo);
    if (setjmp(error.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_mem_src(&cinfo, (unsigned char *)data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST;
    jpeg_start_decompress(&cinfo);
    if (y0 < 0 || x0 < 0 || h < 1 || w < 1 || (JDIMENSION)(y0 + h) > cinfo.output_height
        || (JDIMENSION)(x0 + w) > cinfo.output_width) {
        status = -3;
    } else {
        int left = x0 > PAD ? x0 - PAD : 0;
        int right = x0 + w + PAD < (int)cinfo.output_width ? x0 + w + PAD : (int)cinfo.output_width;
        JDIMENSION offset = (JDIMENSION)left, width = (JDIMENSION)(right - left);
        jpeg_crop_scanline(&cinfo, &offset, &width);
        long stride = (long)cinfo.output_width * 3;  /* output_width is now the cropped width */
        if (stride * h > capacity) {
            status = -2;
        } else {
            if (y0 > 0)
                jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
            for (int row = 0; row < h && status == 0; row++) {
                JSAMPROW pointer = out + row * stride;
                if (jpeg_read_scanlines(&cinfo, &pointer, 1) != 1)
                    status = -1;
            }
            geometry[0] = x0 - (int)offset;
            geometry[1] = (int)cinfo.output_width;
        }
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return status;
}
